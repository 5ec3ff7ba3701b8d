//! The stateful fuzzers' invariants as property tests, run in CI: proptest drives the same
//! operation sequences (decoded from random bytes) through the relay core, the segmenter
//! (with the evidence chain over its output) and the device spool.

use proptest::prelude::*;

proptest! {
    #[test]
    fn relay_subscribers_see_whole_groups_in_order(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        tianwang_fuzz::relay_ops(&data);
    }

    #[test]
    fn recordings_start_at_keyframes_and_their_chain_verifies(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        tianwang_fuzz::segmenter_ops(&data);
    }

    #[test]
    fn the_spool_never_loses_undelivered_groups(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        tianwang_fuzz::spool_ops(&data);
    }

    #[test]
    fn wire_decoders_take_any_bytes_in_any_pieces(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        tianwang_fuzz::control(&data);
        tianwang_fuzz::group_stream(&data);
    }
}
