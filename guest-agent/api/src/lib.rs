//! The agent protocol shared by the shim (client) and the guest agent (server), generated
//! at build time from `protos/agent.proto`.

/// Messages.
#[allow(
    clippy::all,
    missing_docs,
    unused_imports,
    unused_mut,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// The ttrpc service (server trait and client).
#[allow(
    clippy::all,
    missing_docs,
    unused_imports,
    unused_mut,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// vsock port of the ttrpc service inside the guest.
pub const AGENT_PORT: u32 = 1024;
/// vsock port where the shim opens stdio streams.
pub const STDIO_PORT: u32 = 1025;
