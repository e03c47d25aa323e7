//! A real Tollgate server on `127.0.0.1:0`: the Envoy tests' name for
//! [`super::TestServer`].

use tollgate::config::Config;

pub use super::TestServer as Tollgate;

/// Starts Tollgate with `config` on a free port; stopped on drop.
pub async fn start_tollgate(config: Config) -> Tollgate {
    Tollgate::start_config(config).await
}
