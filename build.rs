//! Rebuilds the server when an embedded migration changes (sqlx::migrate! reads them at compile
//! time), and warns when SQLite would be built to sync with fsync() instead of fdatasync().

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    // `.cargo/config.toml` sets LIBSQLITE3_FLAGS for libsqlite3-sys's bundled SQLite; a value set
    // in the environment wins over it, and without HAVE_FDATASYNC every commit also writes the
    // WAL's inode (docs/benchmarks.md, session 15). Still correct, only slower: a warning.
    println!("cargo:rerun-if-env-changed=LIBSQLITE3_FLAGS");
    let flags = std::env::var("LIBSQLITE3_FLAGS").unwrap_or_default();
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && !flags.contains("HAVE_FDATASYNC") {
        println!(
            "cargo:warning=LIBSQLITE3_FLAGS ({flags:?}) lacks -DHAVE_FDATASYNC=1: SQLite will \
             commit with fsync() (see .cargo/config.toml)"
        );
    }
}
