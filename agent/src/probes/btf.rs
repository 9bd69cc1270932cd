//! Kernel struct offsets from the running kernel's BTF.
//!
//! aya has no CO-RE relocations, so the few struct fields the programs read (to find the socket
//! behind an fd and its addresses) are located here at startup and handed over in
//! `KernelConfig`. A kernel without BTF cannot be traced: `sonde check` says so.
use std::path::Path;

use agent_common::KernelOffsets;
use btf_rs::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source} (needs CONFIG_DEBUG_INFO_BTF=y)")]
    Read { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("kernel BTF: {0}")]
    Other(#[from] btf_rs::Error),
}

/// Byte offset of `path` (dot-separated, through anonymous unions/structs) inside `strukt`.
fn offset_of(btf: &Btf, strukt: &str, path: &str) -> Result<u32, BtfError> {
    let mut ty = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| BtfError::NoStruct(strukt.into()))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
    let mut total = 0u32;
    for field in path.split('.') {
        let bits = find_member(btf, &ty, field)?
            .ok_or_else(|| BtfError::NoMember(strukt.into(), path.into()))?;
        total += bits.0 / 8;
        ty = bits.1;
    }
    Ok(total)
}

/// Finds `name` among the members of `ty`, descending into anonymous members. Returns the
/// bit offset and the member's (typedef-resolved) type.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Result<Option<(u32, Type)>, BtfError> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return Ok(None),
    };
    for m in members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        let mty = resolve(btf, btf.resolve_chained_type(m)?)?;
        if mname == name {
            return Ok(Some((m.bit_offset(), mty)));
        }
        if mname.is_empty()
            && let Some((off, t)) = find_member(btf, &mty, name)?
        {
            return Ok(Some((m.bit_offset() + off, t)));
        }
    }
    Ok(None)
}

/// Strips typedefs and qualifiers.
fn resolve(btf: &Btf, mut ty: Type) -> Result<Type, BtfError> {
    loop {
        match &ty {
            Type::Typedef(_)
            | Type::Volatile(_)
            | Type::Const(_)
            | Type::Restrict(_)
            | Type::TypeTag(_) => {
                let inner = ty.as_btf_type().expect("qualifier types are BtfType");
                ty = btf.resolve_chained_type(inner)?;
            }
            _ => return Ok(ty),
        }
    }
}

pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, BtfError> {
    Ok(read(path)?.0)
}

/// What exit-only hooks read: where the first three syscall arguments sit in `struct
/// pt_regs`, and where a thread's context-switch counts sit in `struct task_struct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitOffsets {
    pub regs_args: [u32; 3],
    /// `nvcsw`, `nivcsw`.
    pub task_switches: [u32; 2],
}

/// The kernel offsets, and those exit-only hooks need (None on architectures sonde has no
/// register map for).
pub fn read(path: &Path) -> Result<(KernelOffsets, Option<ExitOffsets>), BtfError> {
    let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let exit = syscall_arg_regs(&btf).and_then(|regs_args| {
        let at = |m: &str| offset_of(&btf, "task_struct", m).ok();
        Some(ExitOffsets {
            regs_args,
            task_switches: [at("nvcsw")?, at("nivcsw")?],
        })
    });
    Ok((offsets(&btf)?, exit))
}

/// Offsets in `struct pt_regs` of syscall arguments 0, 1 and 2 as they still are when the
/// syscall exits. On arm64 the return value overwrites x0, so argument 0 comes from orig_x0.
fn syscall_arg_regs(btf: &Btf) -> Option<[u32; 3]> {
    let at = |m: &str| offset_of(btf, "pt_regs", m).ok();
    if cfg!(target_arch = "x86_64") {
        Some([at("di")?, at("si")?, at("dx")?])
    } else if cfg!(target_arch = "aarch64") {
        let regs = at("regs")?;
        Some([at("orig_x0")?, regs + 8, regs + 16])
    } else {
        None
    }
}

fn offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    Ok(KernelOffsets {
        task_files: offset_of(btf, "task_struct", "files")?,
        files_fdt: offset_of(btf, "files_struct", "fdt")?,
        fdt_max_fds: offset_of(btf, "fdtable", "max_fds")?,
        fdt_fd: offset_of(btf, "fdtable", "fd")?,
        file_private_data: offset_of(btf, "file", "private_data")?,
        socket_sk: offset_of(btf, "socket", "sk")?,
        socket_file: offset_of(btf, "socket", "file")?,
        sk_family: offset_of(btf, "sock", "__sk_common.skc_family")?,
        sk_type: offset_of(btf, "sock", "sk_type")?,
        sk_protocol: offset_of(btf, "sock", "sk_protocol")?,
        sk_daddr: offset_of(btf, "sock", "__sk_common.skc_daddr")?,
        sk_rcv_saddr: offset_of(btf, "sock", "__sk_common.skc_rcv_saddr")?,
        sk_dport: offset_of(btf, "sock", "__sk_common.skc_dport")?,
        sk_num: offset_of(btf, "sock", "__sk_common.skc_num")?,
        sk_v6_daddr: offset_of(btf, "sock", "__sk_common.skc_v6_daddr")?,
        sk_v6_rcv_saddr: offset_of(btf, "sock", "__sk_common.skc_v6_rcv_saddr")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_offsets_in_running_kernel() {
        let p = Path::new(VMLINUX_BTF);
        if !p.exists() {
            eprintln!("no kernel BTF here; skipping");
            return;
        }
        let o = kernel_offsets(p).unwrap();
        // sock_common starts struct sock; these are small, distinct, plausible offsets.
        assert!(
            o.sk_family < 64 && o.sk_num < 64 && o.sk_dport < 64,
            "{o:?}"
        );
        assert_ne!(o.sk_daddr, o.sk_rcv_saddr);
        assert!(o.task_files > 0 && o.sk_type > o.sk_family);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn finds_syscall_argument_registers() {
        let p = Path::new(VMLINUX_BTF);
        if !p.exists() {
            eprintln!("no kernel BTF here; skipping");
            return;
        }
        // The x86-64 pt_regs layout is ABI (arch/x86/include/uapi/asm/ptrace.h): dx, si, di.
        assert_eq!(read(p).unwrap().1.unwrap().regs_args, [112, 104, 96]);
    }
}
