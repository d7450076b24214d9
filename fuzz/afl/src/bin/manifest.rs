//! AFL++ driver of the `manifest` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::manifest(data));
}
