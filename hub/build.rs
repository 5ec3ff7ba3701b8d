// The console's files are compiled into the hub (rust-embed). Cargo notices edits to files
// rust-embed already embeds, but not files added to or removed from the folder: watch it.
fn main() {
    println!("cargo:rerun-if-changed=../web-console");
    println!("cargo:rerun-if-changed=build.rs");
}
