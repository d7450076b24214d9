//! AFL++ driver of the `userdata` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::userdata(data));
}
