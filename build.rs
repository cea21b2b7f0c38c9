//! Rebuilds when a migration is added or changed: they are embedded into the binary at
//! compile time, and cargo does not otherwise look at that folder.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
