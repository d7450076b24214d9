//! AFL++ driver of the `verity` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::verity(data));
}
