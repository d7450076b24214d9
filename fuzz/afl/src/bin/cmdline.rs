//! AFL++ driver of the `cmdline` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::cmdline(data));
}
