//! `sluice-load`: the open-loop load generator. Its engine arrives with its own issue; until
//! then it says so instead of pretending to measure anything.

fn main() {
    eprintln!("sluice-load: the load generator is not built yet (see the loadtest issue)");
    std::process::exit(2);
}
