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
///
/// #[multiproc::task]
/// fn ones(cache: &Vec<String>, i: u32) -> usize { cache[i as usize].matches('1').count() }
/// // a Task<u32, usize, Vec<String>>: pool.map(ones, 0..100) with a pool whose
/// // initializer returns the Vec<String>
/// ```
///
/// The function becomes a constant of type `multiproc::Task<A, R, S>`, where `A` is its
/// argument type (a tuple of them when it takes several, `()` when none), `R` its return type,
/// and `S` the state it reads: the referent of a first parameter of reference type (`&S`), or
/// `()` when the first parameter is not a reference. `A` and `R` must be
/// `Serialize + DeserializeOwned + Send + 'static`. It is registered under
/// `module::path::name`, which must be unique in the executable. Generic, `async` and
/// `self`-taking functions are refused, as is state taken by `&mut`.
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
    let mut inputs: Vec<&syn::PatType> = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => {
                return Err(syn::Error::new_spanned(receiver, "a task cannot take self"));
            }
            FnArg::Typed(typed) => inputs.push(typed),
        }
    }
    // A leading reference parameter is the state: task arguments travel between processes, so
    // no other parameter can be a reference.
    let (state_pattern, state_type) = match inputs.first().map(|typed| (typed, &*typed.ty)) {
        Some((typed, syn::Type::Reference(reference))) => {
            if let Some(mutability) = &reference.mutability {
                return Err(syn::Error::new_spanned(
                    mutability,
                    "task state is shared by every call: take it as `&S`, not `&mut S`",
                ));
            }
            let pattern = &typed.pat;
            let ty = &reference.elem;
            inputs.remove(0);
            (quote!(#pattern), quote!(#ty))
        }
        _ => (quote!(_), quote!(())),
    };
    let patterns: Vec<_> = inputs.iter().map(|typed| &typed.pat).collect();
    let types: Vec<_> = inputs.iter().map(|typed| &typed.ty).collect();
    let (arg_pattern, arg_type) = match (patterns.as_slice(), types.as_slice()) {
        ([pattern], [ty]) => (quote!(#pattern), quote!(#ty)),
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
        #vis const #name: ::multiproc::Task<#arg_type, #output, #state_type> = {
            // The state is borrowed as exactly the type the initializer returned, so clippy's
            // advice to take `&[T]` for `&Vec<T>` does not apply.
            #[allow(clippy::ptr_arg)]
            fn __multiproc_body(#state_pattern: &#state_type, #arg_pattern: #arg_type) -> #output
                #body

            #[allow(unsafe_code)] // linkme places the entry with #[link_section]
            #[::multiproc::__private::linkme::distributed_slice(::multiproc::__private::TASKS)]
            #[linkme(crate = ::multiproc::__private::linkme)]
            static #entry: ::multiproc::__private::TaskEntry = ::multiproc::__private::TaskEntry {
                name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                run: |state, args| ::multiproc::__private::run_encoded(__multiproc_body, state, args),
                run_batch: |state, args, out| {
                    ::multiproc::__private::run_batch(__multiproc_body, state, args, out)
                },
                make_state: |args| ::multiproc::__private::make_state(__multiproc_body, args),
            };

            ::multiproc::Task::__new(
                ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                __multiproc_body,
            )
        };
    })
}
