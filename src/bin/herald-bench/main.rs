//! `herald-bench`: the load generator (placeholder until it lands).

fn main() {
    eprintln!("herald-bench: not built yet");
    std::process::exit(2);
}
