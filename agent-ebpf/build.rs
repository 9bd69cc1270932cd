/// Rebuild when the bpf-linker binary changes (it is an undeclared tool dependency).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // bpf-linker asks LLVM to expand memcpy "in order" by default, which also stops it
    // expanding small memsets: every zeroed byte array in a struct literal (padding, ids)
    // became a call to a byte-at-a-time memset subprogram, 9 per data-syscall exit program.
    // Without the flag LLVM writes them as plain stores.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
