use rowlock::LockableRow;

#[derive(LockableRow)]
#[rowlock(table = "desk.tickets", key = "id")]
struct Ticket {
    id: i64,
}

fn main() {}
