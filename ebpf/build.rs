//! Builds the kernel side: compiles src/bpf/udp_drops.bpf.c with clang for
//! the BPF target (CO-RE, BTF from -g), and compiles and runs
//! src/bpf/layout_probe.c on the host so the Rust mirror of drop_key.h can be
//! checked against the C layout.
//!
//! Environment: CLANG picks the compiler (default `clang` on PATH).
//! ZERODROP_EBPF_SKIP_BUILD=1 builds without the BPF object: the crate then
//! only offers the /proc/net/udp fallback and says so at run time.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str = "install clang, libbpf-dev and linux-libc-dev \
(Debian: `apt-get install clang libbpf-dev linux-libc-dev`, or run scripts/install-deps.sh), \
or set CLANG=/path/to/clang; ZERODROP_EBPF_SKIP_BUILD=1 builds without eBPF (procfs fallback only)";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bpf_dir = manifest_dir.join("src/bpf");
    for file in ["udp_drops.bpf.c", "drop_key.h", "kernel_types.h", "layout_probe.c"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=ZERODROP_EBPF_SKIP_BUILD");
    println!("cargo::rustc-check-cfg=cfg(zerodrop_ebpf_object)");

    let object = out_dir.join("udp_drops.bpf.o");
    let layout = out_dir.join("drop_key_layout.rs");
    if env::var("ZERODROP_EBPF_SKIP_BUILD").is_ok_and(|v| v == "1") {
        println!("cargo:warning=ZERODROP_EBPF_SKIP_BUILD=1: building without the eBPF object (procfs fallback only)");
        std::fs::write(&layout, "// eBPF build skipped (ZERODROP_EBPF_SKIP_BUILD=1)\n").expect("write layout stub");
        return;
    }

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    match Command::new(&clang).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => fail(&format!(
            "`{clang} --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(err) => fail(&format!("clang not found (`{clang}`: {err})")),
    }

    compile_bpf(&clang, &bpf_dir, &object);
    println!("cargo:rustc-cfg=zerodrop_ebpf_object");
    generate_layout(&clang, &bpf_dir, &out_dir, &layout);
}

fn compile_bpf(clang: &str, bpf_dir: &Path, object: &Path) {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // <linux/bpf.h> pulls <asm/types.h>, which Debian keeps under the
    // multiarch directory that clang does not search for -target bpf.
    let (multiarch, target_arch) = match arch.as_str() {
        "x86_64" => ("x86_64-linux-gnu", "x86"),
        "aarch64" => ("aarch64-linux-gnu", "arm64"),
        "riscv64" => ("riscv64-linux-gnu", "riscv"),
        "s390x" => ("s390x-linux-gnu", "s390"),
        other => fail(&format!("unsupported target architecture for the eBPF build: {other}")),
    };
    let asm_include = Path::new("/usr/include").join(multiarch);
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail("libbpf headers not found (/usr/include/bpf/bpf_helpers.h)");
    }
    if !asm_include.join("asm/types.h").exists() && !Path::new("/usr/include/asm/types.h").exists() {
        fail(&format!("kernel UAPI headers not found ({}/asm/types.h)", asm_include.display()));
    }
    let status = Command::new(clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{target_arch}"))
        .arg("-I")
        .arg(bpf_dir)
        .arg("-idirafter")
        .arg(&asm_include)
        .arg("-c")
        .arg(bpf_dir.join("udp_drops.bpf.c"))
        .arg("-o")
        .arg(object)
        .status()
        .unwrap_or_else(|err| fail(&format!("running {clang}: {err}")));
    if !status.success() {
        fail(&format!("{clang} could not compile src/bpf/udp_drops.bpf.c ({status})"));
    }
}

fn generate_layout(clang: &str, bpf_dir: &Path, out_dir: &Path, layout: &Path) {
    let probe = out_dir.join("layout_probe");
    let status = Command::new(clang)
        .arg("-I")
        .arg(bpf_dir)
        .arg(bpf_dir.join("layout_probe.c"))
        .arg("-o")
        .arg(&probe)
        .status()
        .unwrap_or_else(|err| fail(&format!("running {clang} for the layout probe: {err}")));
    if !status.success() {
        fail(&format!("{clang} could not compile src/bpf/layout_probe.c for the host ({status})"));
    }
    let out = Command::new(&probe)
        .output()
        .unwrap_or_else(|err| fail(&format!("running {}: {err}", probe.display())));
    if !out.status.success() {
        fail(&format!("{} failed ({})", probe.display(), out.status));
    }
    std::fs::write(layout, out.stdout).unwrap_or_else(|err| fail(&format!("writing {}: {err}", layout.display())));
}

fn fail(why: &str) -> ! {
    eprintln!("error: zerodrop-ebpf build: {why}");
    eprintln!("hint: {INSTALL_HINT}");
    panic!("zerodrop-ebpf build: {why}; {INSTALL_HINT}");
}
