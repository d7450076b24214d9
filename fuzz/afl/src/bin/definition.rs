//! AFL++ driver of the `definition` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::definition(data));
}
