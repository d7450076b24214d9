//! AFL++ driver of the `engine` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::engine(data));
}
