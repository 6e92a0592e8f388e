//! The one error type of the datapath layer: every failure names the program, map or
//! interface it concerns, so the log line says where to look.

use aya::{maps::MapError, programs::ProgramError};

use super::pin::PinError;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF object failed: {0} (is the agent running as root, with CAP_BPF and CAP_NET_ADMIN?)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {0}: the build is broken")]
    Missing(&'static str),
    #[error("loading program {name} failed: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to {iface} ({dir}) failed: {source}")]
    Attach {
        iface: String,
        dir: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinning the maps: {0}")]
    Pin(#[source] PinError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

impl DatapathError {
    /// A refused map operation on `map`, for `map_err`.
    pub(crate) fn map(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
        move |source| DatapathError::Map { map, source }
    }
}
