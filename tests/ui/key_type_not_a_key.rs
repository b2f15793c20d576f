use rowlock::LockableRow;

#[derive(LockableRow)]
#[rowlock(table = "scores", key = "score")]
struct Score {
    score: f64,
}

fn main() {}
