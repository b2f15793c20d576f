//! The mistakes a user makes with `#[derive(LockableRow)]` fail to compile with a message that
//! says what to fix (expected messages in `tests/ui/*.stderr`).

#[test]
fn derive_mistakes_do_not_compile() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
