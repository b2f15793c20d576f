//! The future type of the closures rowlock runs inside a transaction: boxed, `Send`, and
//! allowed to borrow from the caller's scope as well as from the transaction.
//!
//! A closure `for<'t> FnOnce(&'t Transaction) -> Pin<Box<dyn Future + Send + 't>>` must work for
//! every `'t`, however long, so a future that borrows a caller's `&'a str` does not fit: Rust
//! cannot see that `'t` never outlives the call. [`ScopedBoxFuture<'a, 't, T>`] carries `'a` in
//! a default type parameter whose well-formedness implies `'a: 't`, which restricts the `for<'t>`
//! to the transaction lifetimes that can occur inside the call. This is the technique of the
//! `scoped-futures` crate (used by diesel-async), written out here in a few lines.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

/// A future that lives for `'t` and may borrow data that lives for `'a` (`'a: 't`, implied by
/// the hidden third parameter). Implemented for every future; you never implement or name it.
pub trait ScopedFuture<'a, 't, Bound = PhantomData<&'t &'a ()>>: Future {}

impl<'a, 't, F: Future + 't> ScopedFuture<'a, 't> for F {}

/// The future a closure of [`Db::with_locked_row`](crate::Db::with_locked_row) and friends returns:
/// write `Box::pin(async move { … })`. `'t` is the transaction's borrow, `'a` what the closure
/// may borrow from the caller.
pub type ScopedBoxFuture<'a, 't, T> = Pin<Box<dyn ScopedFuture<'a, 't, Output = T> + Send + 't>>;

/// [`ScopedBoxFuture`] for closures that borrow nothing from the caller: the return type to
/// write on a named function passed instead of a closure.
pub type BoxFuture<'t, T> = ScopedBoxFuture<'static, 't, T>;
