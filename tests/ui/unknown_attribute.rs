use rowlock::LockableRow;

#[derive(LockableRow)]
#[rowlock(table = "accounts", key = "id", tabel = "accounts")]
struct Account {
    id: i64,
}

fn main() {}
