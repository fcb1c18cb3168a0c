//! Process exit codes of `stowage ctl` and `stowage bench`.
//!
//! | code      | meaning                                                                  |
//! |-----------|--------------------------------------------------------------------------|
//! | 0         | success                                                                  |
//! | 1         | local failure: unreadable secrets file, output not writable, floor syscall failed, the driver lacks a capability the bench workload needs |
//! | 2         | usage error: invalid command line (clap uses 2 for its own parse errors, so we keep it for all usage errors) |
//! | 3         | cannot connect to the endpoint (refused, missing socket, or not within `--timeout`) |
//! | 4         | bench: some benchmark operations failed (the run completed)              |
//! | 5         | bench: cleanup incomplete, resources created by the bench may be left    |
//! | 10 + N    | the RPC failed with gRPC status code N, e.g. 15 = NOT_FOUND (5), 14 = DEADLINE_EXCEEDED (4, also used when `--timeout` expires locally), 22 = UNIMPLEMENTED (12) |
//! | 130       | bench: interrupted by SIGINT/SIGTERM; everything it created was cleaned up |
//!
//! When several apply to one bench run, the first of these wins: 5 (leftovers matter most),
//! the setup failure's code, 130, 4.
//!
//! Connection failure is 3 rather than 2 because the `stowage` binary parses its command
//! line with clap, which already exits with 2 on syntax errors; sharing that code would make
//! "wrong flag" and "driver down" indistinguishable to a script.

/// Success.
pub const SUCCESS: u8 = 0;
/// Local failure that is not a usage error (I/O, unreadable secrets file, missing capability).
pub const LOCAL_ERROR: u8 = 1;
/// Invalid command line; the same code clap uses for its parse errors.
pub const USAGE: u8 = 2;
/// The endpoint could not be reached.
pub const CONNECT: u8 = 3;
/// `bench`: the run completed but some operations failed.
pub const BENCH_OPS_FAILED: u8 = 4;
/// `bench`: cleanup could not remove everything the bench created.
pub const BENCH_CLEANUP_INCOMPLETE: u8 = 5;
/// Base added to a gRPC status code (1..=16) to form the exit code of a failed RPC.
pub const GRPC_BASE: u8 = 10;
/// `bench`: interrupted by a signal (or cancelled); cleanup succeeded. 128 + SIGINT, as
/// shells report it.
pub const INTERRUPTED: u8 = 130;

/// Exit code for an RPC that failed with `code`: `10 + code`. `Ok` cannot be a failure, so
/// it maps to [`LOCAL_ERROR`] rather than pretending to succeed.
pub fn from_grpc(code: tonic::Code) -> u8 {
    match code {
        tonic::Code::Ok => LOCAL_ERROR,
        // Codes are 1..=16, so the sum always fits in a u8.
        other => GRPC_BASE + other as u8,
    }
}

/// Text appended to `--help` of both subcommands.
pub const HELP: &str = "\
Exit codes:
  0        success
  1        local failure (secrets file unreadable, output not writable, missing capability)
  2        usage error (invalid command line)
  3        cannot connect to the endpoint (or not within --timeout)
  4        bench: some operations failed
  5        bench: cleanup incomplete (resources may be left behind)
  10+N     the RPC failed with gRPC code N, e.g. 15 NOT_FOUND, 14 DEADLINE_EXCEEDED
           (also when --timeout expires), 22 UNIMPLEMENTED
  130      bench: interrupted (SIGINT/SIGTERM), cleanup done
bench reports the first that applies of: 5, a setup failure, 130, 4.";

/// The canonical upper-case name of a gRPC code, as used in CSI error tables.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_ten_plus_code() {
        assert_eq!(from_grpc(tonic::Code::NotFound), 15);
        assert_eq!(from_grpc(tonic::Code::Cancelled), 11);
        assert_eq!(from_grpc(tonic::Code::Unauthenticated), 26);
        assert_eq!(from_grpc(tonic::Code::DeadlineExceeded), 14);
        assert_eq!(from_grpc(tonic::Code::Ok), LOCAL_ERROR);
    }

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
    }
}
