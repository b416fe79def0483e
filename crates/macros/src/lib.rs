//! multiproc-macros: `#[multiproc::task]`, which registers a function under a stable name in
//! the link-time task table and replaces it with a typed `multiproc::Task` constant.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote};
use syn::{FnArg, ItemFn, ReturnType, parse_macro_input};

/// Declares a function that can run in another process.
///
/// ```ignore
/// #[multiproc::task]
/// fn add(a: u64, b: u64) -> u64 { a + b }
///
/// let p = ctx.process(add, (2, 3)).start()?;   // arguments as one tuple
/// assert_eq!(add.call((2, 3)), 5);             // or run it here
/// ```
///
/// The function becomes a constant of type `multiproc::Task<A, R>`, where `A` is its argument
/// type (a tuple of them when it takes several, `()` when none) and `R` its return type; both
/// must be `Serialize + DeserializeOwned + Send + 'static`. It is registered under
/// `module::path::name`, which must be unique in the executable. Generic, `async` and
/// `self`-taking functions are refused.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(Span::call_site(), "#[multiproc::task] takes no arguments")
            .to_compile_error()
            .into();
    }
    let function = parse_macro_input!(item as ItemFn);
    match expand(function) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

fn expand(function: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &function.sig;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new_spanned(&sig.generics, "a task cannot be generic"));
    }
    if let Some(asyncness) = &sig.asyncness {
        return Err(syn::Error::new_spanned(asyncness, "a task cannot be async"));
    }
    let mut patterns = Vec::new();
    let mut types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => {
                return Err(syn::Error::new_spanned(receiver, "a task cannot take self"));
            }
            FnArg::Typed(typed) => {
                patterns.push(typed.pat.clone());
                types.push(typed.ty.clone());
            }
        }
    }
    let (arg_pattern, arg_type) = match (patterns.len(), patterns.first(), types.first()) {
        (1, Some(pattern), Some(ty)) => (quote!(#pattern), quote!(#ty)),
        _ => (quote!((#(#patterns,)*)), quote!((#(#types,)*))),
    };
    let output = match &sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, ty) => quote!(#ty),
    };
    let name = &sig.ident;
    let vis = &function.vis;
    let attrs = &function.attrs;
    let body = &function.block;
    let entry = format_ident!("__MULTIPROC_TASK_ENTRY");
    Ok(quote! {
        #(#attrs)*
        #[allow(non_upper_case_globals)]
        #vis const #name: ::multiproc::Task<#arg_type, #output> = {
            fn __multiproc_body(#arg_pattern: #arg_type) -> #output #body

            #[allow(unsafe_code)] // linkme places the entry with #[link_section]
            #[::multiproc::__private::linkme::distributed_slice(::multiproc::__private::TASKS)]
            #[linkme(crate = ::multiproc::__private::linkme)]
            static #entry: ::multiproc::__private::TaskEntry = ::multiproc::__private::TaskEntry {
                name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                run: |args| ::multiproc::__private::run_encoded(__multiproc_body, args),
            };

            ::multiproc::Task::__new(
                ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                __multiproc_body,
            )
        };
    })
}
