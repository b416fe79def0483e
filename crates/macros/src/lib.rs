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

/// Whether a reference's referent is `str` or a slice: what a borrowed argument, never a
/// worker's state (which is a sized value the initializer returned), points to.
fn unsized_referent(referent: &syn::Type) -> bool {
    match referent {
        syn::Type::Slice(_) => true,
        syn::Type::Path(path) => path.path.is_ident("str"),
        _ => false,
    }
}

/// The error for a borrowed parameter that is not the worker's state.
fn borrowed_argument(reference: &syn::TypeReference) -> syn::Error {
    syn::Error::new_spanned(
        reference,
        "task arguments travel to another process, so a task takes them as owned values: \
         `String` instead of `&str`, `Vec<T>` instead of `&[T]`. Only a first parameter may \
         be a reference, `&S`: the worker's state, which a pool's initializer returned",
    )
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
                return Err(syn::Error::new_spanned(
                    receiver,
                    "a task cannot take `self`: it runs in another process, which has no `self` \
                     to call it on. Make the object the workers' state instead: \
                     `#[task] fn pow(big: &BigPow, x: u64) -> u64 { big.pow(x) }`, with a pool \
                     whose initializer returns the `BigPow` \
                     (`ctx.pool().initializer(make_big_pow, args).build()?`), then \
                     `pool.map(pow, items)`",
                ));
            }
            FnArg::Typed(typed) => inputs.push(typed),
        }
    }
    // A leading reference parameter is the state: task arguments travel between processes, so
    // no other parameter can be a reference.
    let (state_pattern, state_type) = match inputs.first().map(|typed| (typed, &*typed.ty)) {
        Some((_, syn::Type::Reference(reference))) if unsized_referent(&reference.elem) => {
            return Err(borrowed_argument(reference));
        }
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
    if let Some(reference) = inputs.iter().find_map(|typed| match &*typed.ty {
        syn::Type::Reference(reference) => Some(reference),
        _ => None,
    }) {
        return Err(borrowed_argument(reference));
    }
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
    // The body is an item beside the constant, not inside it: a body that uses a local of the
    // function it is declared in then fails with "can't capture dynamic environment in a fn
    // item" (E0434), which names the problem, instead of "attempt to use a non-constant value
    // in a constant" (E0435).
    let body_name = format_ident!("__multiproc_body_of_{}", name);
    // `cfg`, `allow` and the like hold for the body as for the constant; docs stay on the
    // constant.
    let body_attrs = attrs.iter().filter(|attr| !attr.path().is_ident("doc"));
    Ok(quote! {
        #(#body_attrs)*
        // The state is borrowed as exactly the type the initializer returned, so clippy's
        // advice to take `&[T]` for `&Vec<T>` does not apply.
        #[allow(clippy::ptr_arg, non_snake_case)]
        #[doc(hidden)]
        fn #body_name(#state_pattern: &#state_type, #arg_pattern: #arg_type) -> #output
            #body

        #(#attrs)*
        #[allow(non_upper_case_globals)]
        #vis const #name: ::multiproc::Task<#arg_type, #output, #state_type> = {

            #[allow(unsafe_code)] // linkme places the entry with #[link_section]
            #[::multiproc::__private::linkme::distributed_slice(::multiproc::__private::TASKS)]
            #[linkme(crate = ::multiproc::__private::linkme)]
            static #entry: ::multiproc::__private::TaskEntry = ::multiproc::__private::TaskEntry {
                name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                run: |state, args| ::multiproc::__private::run_encoded(#body_name, state, args),
                run_batch: |state, args, out| {
                    ::multiproc::__private::run_batch(#body_name, state, args, out)
                },
                make_state: |args| ::multiproc::__private::make_state(#body_name, args),
            };

            ::multiproc::Task::__new(
                ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                #body_name,
            )
        };
    })
}
