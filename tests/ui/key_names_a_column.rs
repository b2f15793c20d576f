use rowlock::LockableRow;

#[derive(LockableRow)]
#[rowlock(table = "accounts", key = "account_id")]
struct Account {
    #[rowlock(rename = "account_id")]
    id: i64,
    balance: i64,
}

fn main() {}
