//! Code generation for Tollgate's proto (client side only) and nothing else.

fn main() -> anyhow::Result<()> {
    let proto = "../../proto/tollgate/v1/tollgate.proto";
    let leases = "../../proto/tollgate/v1/leases.proto";
    let files = protox::compile([proto, leases], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(files)?;
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={leases}");
    Ok(())
}
