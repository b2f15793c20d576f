//! `#[derive(LockableRow)]` for rowlock. Use it through rowlock (`rowlock::LockableRow`, the
//! `derive` feature, on by default), not directly: the generated code names `::rowlock`.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, LitStr, parse_macro_input};

/// Implements `rowlock::LockableRow` for a struct with named fields.
///
/// ```text
/// #[derive(LockableRow)]
/// #[rowlock(table = "accounts", key = "id")]
/// struct Account {
///     id: i64,
///     #[rowlock(rename = "balance_cents")]
///     balance: i64,
/// }
/// ```
///
/// Struct attributes: `table = "name"` (required), `schema = "name"`, and `key = "field"` or
/// `key("field", "field", …)` naming the key fields in key order (required). Field attribute:
/// `rename = "column"` when the column is named otherwise. Every field is read by its column
/// name, and only these columns are selected.
#[proc_macro_derive(LockableRow, attributes(rowlock))]
pub fn derive_lockable_row(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// What to write instead of a key that names no field: a composite key written as one
/// string, or a column name where the field's name belongs.
fn unknown_key_message(key: &LitStr, fields: &[Field]) -> String {
    let value = key.value();
    let mut message = format!("the key names no field `{value}` of this struct");
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    if parts.len() > 1 && parts.iter().all(|p| fields.iter().any(|f| f.ident == p)) {
        let list: Vec<String> = parts.iter().map(|p| format!("{p:?}")).collect();
        message.push_str(&format!(
            "; a composite key lists its fields one string each: `key({})`",
            list.join(", ")
        ));
    } else if let Some(f) = fields.iter().find(|f| f.column.value() == value) {
        message.push_str(&format!(
            "; `{value}` is the column of field `{}`: the key names fields, write `key = \"{}\"`",
            f.ident, f.ident
        ));
    }
    message
}

struct Field {
    ident: syn::Ident,
    ty: syn::Type,
    column: LitStr,
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let name = &input.ident;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(
            input.span(),
            "#[derive(LockableRow)] works on structs with named fields",
        ));
    };
    let Fields::Named(named) = &data.fields else {
        return Err(syn::Error::new(
            data.fields.span(),
            "#[derive(LockableRow)] works on structs with named fields",
        ));
    };
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new(
            input.generics.span(),
            "#[derive(LockableRow)] does not support generic structs",
        ));
    }

    let mut table: Option<LitStr> = None;
    let mut schema: Option<LitStr> = None;
    let mut keys: Vec<LitStr> = Vec::new();
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("rowlock")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("table") {
                table = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("schema") {
                schema = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("key") {
                if meta.input.peek(syn::Token![=]) {
                    keys.push(meta.value()?.parse()?);
                } else {
                    let content;
                    syn::parenthesized!(content in meta.input);
                    let list = content.parse_terminated(|p| p.parse::<LitStr>(), syn::Token![,])?;
                    keys.extend(list);
                }
            } else {
                return Err(
                    meta.error("unknown rowlock attribute: expected `table`, `schema` or `key`")
                );
            }
            Ok(())
        })?;
    }
    let Some(table) = table else {
        return Err(syn::Error::new(
            name.span(),
            "missing #[rowlock(table = \"...\")]: which table are these rows in?",
        ));
    };
    if let Some((schema_part, table_part)) = table.value().split_once('.') {
        return Err(syn::Error::new(
            table.span(),
            format!(
                "`table = \"{}\"` would name one table called \"{}\", dot included; for table \
                 `{table_part}` in schema `{schema_part}` write `schema = \"{schema_part}\", table = \
                 \"{table_part}\"`",
                table.value(),
                table.value()
            ),
        ));
    }
    if keys.is_empty() {
        return Err(syn::Error::new(
            name.span(),
            "missing #[rowlock(key = \"field\")]: which field(s) identify a row?",
        ));
    }

    let mut fields = Vec::new();
    for f in &named.named {
        let ident = f.ident.clone().expect("named fields");
        let mut column = LitStr::new(&ident.to_string(), ident.span());
        for attr in f.attrs.iter().filter(|a| a.path().is_ident("rowlock")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename") {
                    column = meta.value()?.parse()?;
                    Ok(())
                } else {
                    Err(meta.error("unknown rowlock field attribute: expected `rename`"))
                }
            })?;
        }
        fields.push(Field {
            ident,
            ty: f.ty.clone(),
            column,
        });
    }

    let mut key_fields = Vec::new();
    for key in &keys {
        let Some(field) = fields.iter().find(|f| f.ident == key.value()) else {
            return Err(syn::Error::new(
                key.span(),
                unknown_key_message(key, &fields),
            ));
        };
        key_fields.push(field);
    }

    let table_expr = match &schema {
        Some(schema) => quote!(::rowlock::Table::qualified(#schema, #table)),
        None => quote!(::rowlock::Table::new(#table)),
    };
    let key_columns = key_fields.iter().map(|f| &f.column);
    let columns = fields.iter().map(|f| &f.column);
    let (key_type, key_value) = if let [single] = key_fields.as_slice() {
        let (ty, ident) = (&single.ty, &single.ident);
        (
            quote!(#ty),
            quote!(::std::clone::Clone::clone(&self.#ident)),
        )
    } else {
        let types = key_fields.iter().map(|f| &f.ty);
        let idents = key_fields.iter().map(|f| &f.ident);
        (
            quote!((#(#types,)*)),
            quote!((#(::std::clone::Clone::clone(&self.#idents),)*)),
        )
    };
    let reads = fields.iter().map(|f| {
        let (ident, ty, column) = (&f.ident, &f.ty, &f.column);
        quote!(#ident: row.try_get::<_, #ty>(#column)?)
    });
    let checks = fields.iter().map(|f| {
        let (ident, ty, column) = (&f.ident, &f.ty, &f.column);
        let field = LitStr::new(&ident.to_string(), ident.span());
        quote! {
            if let ::std::result::Result::Err(error) = row.try_get::<_, #ty>(#column) {
                return ::std::option::Option::Some(::rowlock::MisfitColumn {
                    column: #column,
                    field: #field,
                    error,
                });
            }
        }
    });
    let span = Span::call_site();
    let row = syn::Ident::new("row", span);
    Ok(quote! {
        impl ::rowlock::LockableRow for #name {
            type Key = #key_type;
            const TABLE: ::rowlock::Table = #table_expr;
            const KEY_COLUMNS: &'static [&'static str] = &[#(#key_columns),*];
            const COLUMNS: &'static [&'static str] = &[#(#columns),*];
            fn from_row(#row: &::rowlock::tokio_postgres::Row)
                -> ::std::result::Result<Self, ::rowlock::tokio_postgres::Error> {
                ::std::result::Result::Ok(#name { #(#reads),* })
            }
            fn key(&self) -> Self::Key {
                #key_value
            }
            fn misfit_column(#row: &::rowlock::tokio_postgres::Row)
                -> ::std::option::Option<::rowlock::MisfitColumn> {
                #(#checks)*
                ::std::option::Option::None
            }
        }
    })
}

/// `#[rowlock_testing::test]`: an async test handed a ready database (use it through
/// `rowlock-testing`, which re-exports it; the generated code names `::rowlock_testing`).
///
/// ```text
/// #[rowlock_testing::test(setup = "CREATE TABLE accounts (id bigint PRIMARY KEY)")]
/// async fn locks(db: rowlock::Db) { … }
/// ```
///
/// The function is `async`, takes nothing, a `rowlock::Db` or a
/// `rowlock_testing::TestDatabase`, and may return a `Result`. `setup = "SQL"` (any `&str`
/// expression: a literal or a `const` several tests share), or `setup_file = "path"`
/// (relative to the crate's `Cargo.toml`), runs once on a template that every test's fresh
/// database copies. Other attributes (`#[ignore]`, …) are kept.
#[proc_macro_attribute]
pub fn test(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand_test(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand_test(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> syn::Result<proc_macro2::TokenStream> {
    let function: syn::ItemFn = syn::parse2(item)?;
    let mut setup = quote!("");
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("setup") {
            // Any `&str` expression: a literal, a `const` several tests share, `concat!`.
            let sql: syn::Expr = meta.value()?.parse()?;
            setup = quote!(#sql);
            Ok(())
        } else if meta.path.is_ident("setup_file") {
            let path: LitStr = meta.value()?.parse()?;
            setup = quote!(::core::include_str!(::core::concat!(
                ::core::env!("CARGO_MANIFEST_DIR"),
                "/",
                #path
            )));
            Ok(())
        } else {
            Err(meta.error(
                "expected `setup = \"SQL\"` (or a `&str` constant) or `setup_file = \"path\"`",
            ))
        }
    });
    syn::parse::Parser::parse2(parser, attr)?;
    if function.sig.asyncness.is_none() {
        return Err(syn::Error::new(
            function.sig.fn_token.span(),
            "#[rowlock_testing::test] needs an `async fn`",
        ));
    }
    let inputs: Vec<_> = function.sig.inputs.iter().collect();
    let (pattern, ty) = match inputs.as_slice() {
        [] => (quote!(_), quote!(::rowlock_testing::TestDatabase)),
        [syn::FnArg::Typed(arg)] => {
            let (pat, ty) = (&arg.pat, &arg.ty);
            (quote!(#pat), quote!(#ty))
        }
        _ => {
            return Err(syn::Error::new(
                function.sig.inputs.span(),
                "#[rowlock_testing::test] hands the test one argument: a rowlock::Db or a \
                 rowlock_testing::TestDatabase",
            ));
        }
    };
    let attrs = &function.attrs;
    let vis = &function.vis;
    let name = &function.sig.ident;
    let output = &function.sig.output;
    let body = &function.block;
    Ok(quote! {
        #[::core::prelude::v1::test]
        #(#attrs)*
        #vis fn #name() #output {
            let setup: &str = #setup;
            ::rowlock_testing::__private::run(setup, |#pattern: #ty| async move #body)
        }
    })
}
