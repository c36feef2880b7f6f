//! Protocol gateways. Each turns its protocol's traffic into the same few policy
//! actions and uses the shared broker, policy and record: one enforcement model for
//! every protocol.

pub(crate) mod cast;
pub mod http;
pub mod kube;
pub(crate) mod line_mask;
pub mod postgres;
pub mod protocol;
pub mod session;
pub mod ssh;

pub use cast::replay_cast;
pub use protocol::{Advertised, Protocol, ProtocolGateway, Protocols};
pub use session::{CutSignal, ProxyServices, SessionCore, SessionEnd, Verdict, Via};
