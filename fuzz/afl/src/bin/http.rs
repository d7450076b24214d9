//! AFL++ driver of the `http` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::http(data));
}
