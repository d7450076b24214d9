//! AFL++ driver of the `dhcp` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::dhcp(data));
}
