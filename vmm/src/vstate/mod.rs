//! The machine's KVM parts: opening `/dev/kvm`, guest memory, the vCPUs (CPUID, boot
//! registers, run loop, saved state) and the interrupt routes of the KVM VM.

pub mod cpuid;
pub mod interrupts;
pub mod kvm;
pub mod memory;
pub mod regs;
pub mod topology;
pub mod vcpu;
