//! vCPU threads: CPUID set-up, the KVM_RUN loop, and dispatch of port and
//! MMIO exits to the machine's buses.
//!
//! A vCPU thread never decides the machine's fate itself: resets, power-off
//! and fatal errors are sent to the main loop as [`VmEvent`]s, which stops
//! every vCPU and then rebuilds or exits.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_run, CpuId, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::machine::Machine;
use crate::{EventSender, VmEvent, VmmError};

/// Builds the CPUID a vCPU sees: what KVM supports, with the topology
/// describing `ncpus` single-threaded cores in one socket and this vCPU's
/// APIC ID.
pub fn cpuid_for(base: &CpuId, id: u32, ncpus: u32) -> CpuId {
    let mut cpuid = base.clone();
    let core_bits = 32 - (ncpus.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((ncpus.min(255)) << 16);
                if ncpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count field is valid
                }
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | (((1u32 << core_bits) - 1) << 26);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = ncpus;
                        e.ecx = 0x200 | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

pub fn create(kvm: &Kvm, vm: &VmFd, ncpus: u32) -> Result<Vec<VcpuFd>, VmmError> {
    let base = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Kvm(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    (0..ncpus)
        .map(|id| {
            let vcpu = vm
                .create_vcpu(id as u64)
                .map_err(|e| VmmError::Kvm(format!("cannot create vCPU {id}: {e}")))?;
            vcpu.set_cpuid2(&cpuid_for(&base, id, ncpus))
                .map_err(|e| VmmError::Kvm(format!("vCPU {id}: KVM_SET_CPUID2: {e}")))?;
            Ok(vcpu)
        })
        .collect()
}

/// A vCPU exit that ends the machine, with what is needed to report it
/// once the exit's borrow of the vCPU is over.
enum Fatal {
    Internal,
    FailEntry(u64, u32),
    Unexpected(String),
}

/// Runs one vCPU until `stop` is set or the guest does something that ends
/// the machine's current life (reset, shutdown, fatal error).
pub fn run(
    mut vcpu: VcpuFd,
    id: u32,
    pc: Arc<Machine>,
    stop: Arc<AtomicBool>,
    gate: Arc<crate::VcpuGate>,
    events: EventSender,
) {
    let run_area: *const kvm_run = vcpu.get_kvm_run();
    while !stop.load(Ordering::Acquire) {
        gate.wait(&stop);
        if stop.load(Ordering::Acquire) {
            break;
        }
        let exit = vcpu.run();
        // SAFETY: `run_area` points at this vCPU's kvm_run mapping, which
        // lives as long as `vcpu`. After a KVM_EXIT_IO, KVM has filled the
        // `io` member; it is read by value and does not overlap the data
        // area `exit` borrows (that lies at `io.data_offset`, past the
        // struct). For other exits the value is unused.
        let io_size = usize::from(unsafe { (*run_area).__bindgen_anon_1.io.size }).clamp(1, 4);
        let outcome: Result<Option<VmEvent>, Fatal> = match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                // A string instruction (`rep insb/insw/insl`) arrives as one
                // exit carrying `count` elements; each is one port access.
                for element in data.chunks_mut(io_size) {
                    pc.io.read(port as u64, element);
                }
                Ok(None)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                for element in data.chunks(io_size) {
                    pc.io.write(port as u64, element);
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                pc.mmio.read(addr, data);
                Ok(None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                // Writes to the BIOS ROM (a read-only slot) land here too and
                // are dropped, as ROM would drop them.
                pc.mmio.write(addr, data);
                Ok(None)
            }
            Ok(VcpuExit::Hlt) => Ok(None),
            Ok(VcpuExit::Shutdown) => {
                log::info!("vCPU {id}: triple fault, resetting");
                Ok(Some(VmEvent::Reset))
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => Ok(Some(VmEvent::Reset)),
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => Ok(Some(VmEvent::Shutdown)),
            Ok(VcpuExit::InternalError) => Err(Fatal::Internal),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(Fatal::FailEntry(reason, cpu)),
            Ok(other) => Err(Fatal::Unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => Err(Fatal::Unexpected(format!("KVM_RUN failed: {e}"))),
        };
        let event = match outcome {
            Ok(ev) => ev,
            Err(Fatal::Internal) => Some(VmEvent::Error(internal_error_report(&mut vcpu, id, &pc))),
            Err(Fatal::FailEntry(reason, cpu)) => Some(VmEvent::Error(format!(
                "vCPU {id}: KVM entry failed, hardware reason {reason:#x} on host CPU {cpu}\n{}",
                registers(&vcpu, &pc)
            ))),
            Err(Fatal::Unexpected(what)) => Some(VmEvent::Error(format!(
                "vCPU {id}: unexpected exit: {what}\n{}",
                registers(&vcpu, &pc)
            ))),
        };
        if let Some(ev) = event {
            events.send(ev);
            // Park until the main loop stops every vCPU.
            while !stop.load(Ordering::Acquire) {
                std::thread::park_timeout(std::time::Duration::from_millis(10));
            }
        }
    }
}

fn internal_error_report(vcpu: &mut VcpuFd, id: u32, pc: &Machine) -> String {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is
    // the union member KVM filled in.
    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let what = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        "emulation failure: the instruction cannot be emulated by this host's KVM".to_string()
    } else {
        format!("suberror {}", internal.suberror)
    };
    format!(
        "vCPU {id}: KVM internal error ({what})\n{}",
        registers(vcpu, pc)
    )
}

/// The registers and the code bytes at RIP, for fatal-exit reports.
pub fn registers(vcpu: &VcpuFd, pc: &Machine) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "  (registers unavailable)".into();
    };
    let mut out = String::new();
    let long_mode = s.efer & (1 << 10) != 0 && s.cs.l != 0;
    let linear = if long_mode {
        r.rip
    } else {
        s.cs.base.wrapping_add(r.rip)
    };
    let phys = if s.cr0 & (1 << 31) != 0 {
        vcpu.translate_gva(linear)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address)
    } else {
        Some(linear & 0xffff_ffff)
    };
    let _ = writeln!(
        out,
        "  RIP={:016x} CS={:04x} (base {:x}) RFLAGS={:08x} CR0={:08x} CR3={:x} CR4={:x} EFER={:x}",
        r.rip, s.cs.selector, s.cs.base, r.rflags, s.cr0, s.cr3, s.cr4, s.efer
    );
    let _ = writeln!(
        out,
        "  RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
        r.rax, r.rbx, r.rcx, r.rdx
    );
    let _ = writeln!(
        out,
        "  RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
        r.rsi, r.rdi, r.rbp, r.rsp
    );
    let _ = writeln!(
        out,
        "  R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
        r.r8, r.r9, r.r10, r.r11
    );
    let _ = writeln!(
        out,
        "  R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
        r.r12, r.r13, r.r14, r.r15
    );
    let _ = writeln!(
        out,
        "  DS={:04x} ES={:04x} SS={:04x} FS={:04x} GS={:04x}",
        s.ds.selector, s.es.selector, s.ss.selector, s.fs.selector, s.gs.selector
    );
    let code = phys.and_then(|p| {
        let mut b = [0u8; 16];
        pc.ram
            .read_slice(&mut b, GuestAddress(p))
            .or_else(|_| pc.rom.read_slice(&mut b, GuestAddress(p)))
            .ok()
            .map(|_| b)
    });
    match code {
        Some(b) => {
            let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
            let _ = write!(out, "  code at RIP: {}", hex.join(" "));
        }
        None => {
            let _ = write!(out, "  code at RIP: (not in guest memory)");
        }
    }
    out
}

/// Puts vCPU 0 at a directly booted kernel's entry (see `boot::cpu`):
/// segments from the boot GDT, the protocol's registers, long mode on the
/// identity page tables if asked for, a reset-state FPU, and the local
/// APIC's LINT0/LINT1 wired as ExtINT/NMI as firmware would leave them.
pub fn set_boot_state(vcpu: &VcpuFd, e: &crate::boot::EntryState) -> Result<(), VmmError> {
    use crate::boot::{self, cpu};
    let err = |what: &str| {
        let what = what.to_string();
        move |e: kvm_ioctls::Error| VmmError::Kvm(format!("vCPU 0: {what}: {e}"))
    };
    let mut s = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let seg = |sel: u16| {
        let d = cpu::segment(cpu::GDT[(sel >> 3) as usize]);
        kvm_bindings::kvm_segment {
            base: d.base,
            limit: d.limit,
            selector: sel,
            type_: d.type_,
            present: d.present,
            dpl: d.dpl,
            db: d.db,
            s: d.s,
            l: d.l,
            g: d.g,
            avl: d.avl,
            unusable: 0,
            padding: 0,
        }
    };
    let long = e.mode == boot::CpuMode::Long64;
    s.cs = seg(if long { cpu::CODE64_SEL } else { cpu::CODE_SEL });
    let data = seg(cpu::DATA_SEL);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = seg(cpu::TSS_SEL);
    s.gdt.base = boot::GDT_ADDR;
    s.gdt.limit = (cpu::GDT.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    if long {
        s.cr3 = boot::PML4_ADDR;
        s.cr4 = CR4_PAE;
        s.cr0 = CR0_PE | CR0_ET | CR0_PG;
        s.efer = EFER_LME | EFER_LMA;
    } else {
        s.cr0 = CR0_PE | CR0_ET;
        s.cr3 = 0;
        s.cr4 = 0;
        s.efer = 0;
    }
    vcpu.set_sregs(&s).map_err(err("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rflags: 2,
        rip: e.rip,
        rsp: e.rsp,
        rax: e.rax,
        rbx: e.rbx,
        rsi: e.rsi,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let mut set_lvt = |off: usize, mode: u32| {
        let b = &mut lapic.regs[off..off + 4];
        let v = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
        let v = (v & !0x0001_0700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            b[i] = *x as _;
        }
    };
    set_lvt(0x350, 7); // LINT0: ExtINT, unmasked
    set_lvt(0x360, 4); // LINT1: NMI, unmasked
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
    Ok(())
}
