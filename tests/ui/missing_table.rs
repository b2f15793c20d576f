use rowlock::LockableRow;

#[derive(LockableRow)]
#[rowlock(key = "id")]
struct Account {
    id: i64,
}

fn main() {}
