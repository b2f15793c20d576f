use rowlock::LockableRow;

#[derive(LockableRow)]
#[rowlock(table = "seats", key = "venue, seat_no")]
struct Seat {
    venue: i64,
    seat_no: i16,
    holder: Option<String>,
}

fn main() {}
