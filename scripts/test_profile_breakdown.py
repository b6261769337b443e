"""Tests of scripts/profile_breakdown.py on stacks shaped like inferno-collapse-perf's output
of `muster serve` (run by scripts/test.sh: python3 -m unittest discover -s scripts)."""

import os
import subprocess
import sys
import tempfile
import unittest

import profile_breakdown as pb

WRITER = "muster-store-wr;clone3;start_thread;muster_store::sqlite::writer::run"
WORKER = "tokio-rt-worker;clone3;start_thread;tokio::runtime::scheduler::multi_thread::worker::run"


def category(stack):
    return pb.classify_stack(stack.split(";"))


class InnermostRecognisableFrame(unittest.TestCase):
    def test_the_innermost_recognised_frame_decides(self):
        self.assertEqual(category(WRITER + ";sqlite3_step;sqlite3VdbeExec"), "SQLite")
        # memcpy inside SQLite is copying, SQLite's caller does not matter.
        self.assertEqual(
            category(WRITER + ";sqlite3VdbeExec;__memcpy_avx512_unaligned_erms"),
            "allocation and copying",
        )
        # A static SQLite function is not recognised by name: its sqlite3 caller decides.
        self.assertEqual(category(WRITER + ";sqlite3BtreeInsert;balance_nonroot"), "SQLite")

    def test_frames_that_name_nothing_are_passed_over(self):
        stack = (
            WORKER + ";serde_json::ser::to_writer;core::fmt::write;"
            "<core::fmt::rt::Argument>::fmt;{closure#0}"
        )
        self.assertEqual(category(stack), "JSON")
        self.assertEqual(category(WORKER + ";[muster];[unknown]"), "tokio runtime")

    def test_a_trait_impl_is_counted_by_its_type(self):
        frame = "<muster_server::metered_store::MeteredStore as muster_store::Store>::write"
        self.assertEqual(pb.classify_frame(frame), "Muster's own code")
        frame = "<alloc::vec::Vec<T,A> as core::ops::drop::Drop>::drop"
        self.assertIsNone(pb.classify_frame(frame))
        frame = "<rustls::crypto::ring::kx::KeyExchange as rustls::crypto::ActiveKeyExchange>::complete"
        self.assertEqual(pb.classify_frame(frame), "TLS")

    def test_generic_arguments_do_not_name_the_frame(self):
        frame = (
            "and_then<rusqlite::cache::CachedStatement, rusqlite::error::Error, "
            "muster_store::sqlite::writer::apply_batch::{closure_env#0}>"
        )
        self.assertIsNone(pb.classify_frame(frame))
        frame = "map_or_else<&str, alloc::string::String, fn(&str) -> alloc::string::String>"
        self.assertIsNone(pb.classify_frame(frame))

    def test_the_thread_name_is_not_a_frame(self):
        self.assertEqual(pb.classify_stack(["muster"]), pb.OTHER)
        self.assertEqual(pb.classify_stack(["tokio-rt-worker", "computeCellSize"]), pb.OTHER)

    def test_kernel_frames(self):
        self.assertEqual(
            category(WORKER + ";__GI___writev;entry_SYSCALL_64;do_syscall_64;tcp_sendmsg_locked"
                     ";__ip_queue_xmit;__dev_queue_xmit;__wake_up_sync_key;try_to_wake_up"),
            "kernel scheduling and futexes",
        )
        self.assertEqual(category(WORKER + ";__GI___writev;do_syscall_64"), "kernel networking")
        self.assertEqual(
            category(WRITER + ";sqlite3WalSync;unixSync;fdatasync;__x64_sys_fdatasync"
                     ";ext4_sync_file;jbd2_complete_transaction"),
            "fsync and disk I/O",
        )
        self.assertEqual(
            category(WORKER + ";std::sys::pal::unix::futex::futex_wait;syscall;do_syscall_64"),
            "kernel scheduling and futexes",
        )

    def test_sealing_and_hmac(self):
        self.assertEqual(
            category(WORKER + ";muster_store::sealing::Sealer::open_bytes;"
                     "poly1305::backend::avx2::State::compute_block"),
            "sealing",
        )
        self.assertEqual(category(WORKER + ";muster_store::sealing::Sealer::seal_bytes"), "sealing")
        self.assertEqual(
            category(WORKER + ";muster_registration::device_auth::attest;"
                     "sha2::sha256::x86::digest_blocks"),
            "HMAC and SHA-2 (attestation, tokens)",
        )

    def test_shares_add_up_and_the_command_prints_them(self):
        lines = [
            WRITER + ";sqlite3VdbeExec 30\n",
            WORKER + ";serde_json::to_vec 10\n",
            WORKER + ";muster_registration::engine::Engine::register;mi_malloc 50\n",
            "tokio-rt-worker;computeCellSize 10\n",
            "not a folded line\n",
        ]
        categories, threads, other, total = pb.breakdown(lines)
        self.assertEqual(total, 100)
        self.assertEqual(categories["SQLite"], 30)
        self.assertEqual(categories["allocation and copying"], 50)
        self.assertEqual(categories[pb.OTHER], 10)
        self.assertEqual(threads["tokio-rt-worker"], 70)
        self.assertEqual(other["computeCellSize"], 10)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "x.folded")
            with open(path, "w") as f:
                f.writelines(lines)
            out = subprocess.run(
                [sys.executable, pb.__file__, path, "--threads", "--other", "3"],
                check=True, capture_output=True, text=True,
            ).stdout
        self.assertIn("allocation and copying                  50.0%", out)
        self.assertIn("SQLite                                  30.0%", out)
        self.assertIn("muster-store-wr                         30.0%", out)
        self.assertIn("10.0%  computeCellSize", out)


if __name__ == "__main__":
    unittest.main()
