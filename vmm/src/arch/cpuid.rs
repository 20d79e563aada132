//! CPUID as the guest sees it: KVM's supported set, normalised for a microVM's topology and
//! with features the operator wants hidden removed.

use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Errors in CPUID configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    #[error("unknown CPU feature {0:?} (known: xsave, cx16, avx, pmu)")]
    UnknownFeature(String),
}

/// Features that can be hidden from the guest. Hiding XSAVE and CX16 lets a Linux guest run
/// further on hosts whose KVM emulates guest code (the emulator cannot run those instructions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuFeature {
    /// XSAVE and everything that needs it (AVX, AVX2, AVX-512, FMA, F16C, leaf 0xd).
    Xsave,
    /// CMPXCHG16B.
    Cx16,
    /// AVX and its descendants only.
    Avx,
    /// The architectural performance monitoring unit (leaf 0xa).
    Pmu,
}

impl FromStr for CpuFeature {
    type Err = CpuidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "xsave" => Ok(Self::Xsave),
            "cx16" | "cmpxchg16b" => Ok(Self::Cx16),
            "avx" => Ok(Self::Avx),
            "pmu" => Ok(Self::Pmu),
            other => Err(CpuidError::UnknownFeature(other.to_string())),
        }
    }
}

#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// (leaf, subleaf, register, bit) of one CPUID feature flag.
type Bit = (u32, u32, Reg, u8);

const LEAF1_HTT: Bit = (1, 0, Reg::Edx, 28);
const LEAF1_TSC_DEADLINE: Bit = (1, 0, Reg::Ecx, 24);
const LEAF1_HYPERVISOR: Bit = (1, 0, Reg::Ecx, 31);

const AVX_BITS: &[Bit] = &[
    (1, 0, Reg::Ecx, 12),           // FMA
    (1, 0, Reg::Ecx, 28),           // AVX
    (1, 0, Reg::Ecx, 29),           // F16C
    (7, 0, Reg::Ebx, 5),            // AVX2
    (7, 0, Reg::Ebx, 16),           // AVX512F
    (7, 0, Reg::Ebx, 17),           // AVX512DQ
    (7, 0, Reg::Ebx, 21),           // AVX512IFMA
    (7, 0, Reg::Ebx, 26),           // AVX512PF
    (7, 0, Reg::Ebx, 27),           // AVX512ER
    (7, 0, Reg::Ebx, 28),           // AVX512CD
    (7, 0, Reg::Ebx, 30),           // AVX512BW
    (7, 0, Reg::Ebx, 31),           // AVX512VL
    (7, 0, Reg::Ecx, 1),            // AVX512VBMI
    (7, 0, Reg::Ecx, 6),            // AVX512VBMI2
    (7, 0, Reg::Ecx, 11),           // AVX512VNNI
    (7, 0, Reg::Ecx, 12),           // AVX512BITALG
    (7, 0, Reg::Ecx, 14),           // AVX512VPOPCNTDQ
    (0x8000_0001, 0, Reg::Ecx, 11), // XOP
    (0x8000_0001, 0, Reg::Ecx, 16), // FMA4
];
const XSAVE_BITS: &[Bit] = &[
    (1, 0, Reg::Ecx, 26), // XSAVE
    (1, 0, Reg::Ecx, 27), // OSXSAVE
];
const CX16_BITS: &[Bit] = &[(1, 0, Reg::Ecx, 13)];

fn reg(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn set_bit(entries: &mut [kvm_cpuid_entry2], (leaf, sub, r, bit): Bit, on: bool) {
    for e in entries
        .iter_mut()
        .filter(|e| e.function == leaf && e.index == sub)
    {
        let v = reg(e, r);
        if on {
            *v |= 1 << bit;
        } else {
            *v &= !(1 << bit);
        }
    }
}

fn zero_leaf(entries: &mut [kvm_cpuid_entry2], leaf: u32) {
    for e in entries.iter_mut().filter(|e| e.function == leaf) {
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
    }
}

/// Number of bits needed to hold ids 0..n-1.
fn id_bits(n: u8) -> u32 {
    (n.max(1) as u32).next_power_of_two().trailing_zeros()
}

/// What one vCPU's CPUID should describe.
#[derive(Clone, Debug)]
pub struct CpuidSpec<'a> {
    pub vcpu_id: u8,
    pub vcpus: u8,
    pub tsc_deadline: bool,
    pub hidden: &'a [CpuFeature],
}

/// Rewrites KVM's supported CPUID for one vCPU: its APIC id, a one-socket topology of
/// `vcpus` cores with one thread each, the hypervisor bit, and hidden features cleared.
pub fn normalize(cpuid: &mut CpuId, spec: &CpuidSpec) {
    let entries = cpuid.as_mut_slice();
    let (id, n) = (spec.vcpu_id as u32, spec.vcpus as u32);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // Initial APIC id, logical processor count; keep CLFLUSH size and brand.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (n << 16);
            }
            4 => {
                // Cores per package in EAX[31:26]; caches up to L2 are per core, L3 shared.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((n - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            0xb => {
                let shift_core = id_bits(spec.vcpus);
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, 1 << 8),                // SMT level: one thread
                    1 => (shift_core, n, 1 | (2 << 8)), // core level: n cores
                    sub => (0, 0, sub),                 // no more levels
                };
                e.edx = id;
            }
            _ => {}
        }
    }
    set_bit(entries, LEAF1_HYPERVISOR, true);
    set_bit(entries, LEAF1_HTT, spec.vcpus > 1);
    set_bit(entries, LEAF1_TSC_DEADLINE, spec.tsc_deadline);
    for f in spec.hidden {
        match f {
            CpuFeature::Xsave => {
                for &b in XSAVE_BITS.iter().chain(AVX_BITS) {
                    set_bit(entries, b, false);
                }
                zero_leaf(entries, 0xd);
            }
            CpuFeature::Avx => AVX_BITS.iter().for_each(|&b| set_bit(entries, b, false)),
            CpuFeature::Cx16 => CX16_BITS.iter().for_each(|&b| set_bit(entries, b, false)),
            CpuFeature::Pmu => zero_leaf(entries, 0xa),
        }
    }
}

/// The hidden features whose main flag is still set in `cpuid` (read back from KVM): some
/// KVM flavours force flags on whatever the VMM asked, and the operator should know.
pub fn still_visible(cpuid: &CpuId, hidden: &[CpuFeature]) -> Vec<CpuFeature> {
    let flag = |(leaf, sub, r, bit): Bit| {
        cpuid.as_slice().iter().any(|e| {
            let v = match r {
                Reg::Ebx => e.ebx,
                Reg::Ecx => e.ecx,
                Reg::Edx => e.edx,
            };
            e.function == leaf && e.index == sub && v & (1 << bit) != 0
        })
    };
    hidden
        .iter()
        .copied()
        .filter(|f| match f {
            CpuFeature::Xsave => flag(XSAVE_BITS[0]),
            CpuFeature::Cx16 => flag(CX16_BITS[0]),
            CpuFeature::Avx => flag(AVX_BITS[1]),
            CpuFeature::Pmu => cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == 0xa && e.eax != 0),
        })
        .collect()
}

/// Parses a comma-separated feature list such as `xsave,cx16`.
pub fn parse_features(list: &str) -> Result<Vec<CpuFeature>, CpuidError> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(
                1,
                0,
                0x906ea,
                0x0008_0800,
                (1 << 26) | (1 << 27) | (1 << 28) | (1 << 13),
                0,
            ),
            entry(4, 0, 1 << 5, 0, 0, 0),
            entry(4, 3, 3 << 5, 0, 0, 0),
            entry(7, 0, 0, (1 << 5) | (1 << 16) | 1, 0, 0),
            entry(0xa, 0, 0x0730_0404, 0, 0, 0x603),
            entry(0xb, 0, 0, 0, 0, 0),
            entry(0xb, 1, 0, 0, 0, 0),
            entry(0xb, 2, 0, 0, 0, 0),
            entry(0xd, 0, 7, 0x240, 0x340, 0),
            entry(0xd, 1, 0xf, 0, 0, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_and_apic_id() {
        let mut c = sample();
        normalize(
            &mut c,
            &CpuidSpec {
                vcpu_id: 2,
                vcpus: 3,
                tsc_deadline: true,
                hidden: &[],
            },
        );
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 3, "logical processors");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC deadline");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT with several CPUs");
        assert_eq!(find(&c, 4, 0).eax >> 26, 2);
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 2, "L3 shared by all");
        assert_eq!((find(&c, 4, 0).eax >> 14) & 0xfff, 0, "L1 per core");
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
        assert_eq!(find(&c, 0xb, 2).ecx >> 8, 0, "level list terminated");
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = sample();
        normalize(
            &mut c,
            &CpuidSpec {
                vcpu_id: 0,
                vcpus: 1,
                tsc_deadline: false,
                hidden: &[],
            },
        );
        assert_eq!(find(&c, 1, 0).edx & (1 << 28), 0);
        assert_eq!(find(&c, 1, 0).ecx & (1 << 24), 0);
    }

    #[test]
    fn hiding_xsave_removes_dependents() {
        let mut c = sample();
        let hidden = [CpuFeature::Xsave, CpuFeature::Cx16];
        normalize(
            &mut c,
            &CpuidSpec {
                vcpu_id: 0,
                vcpus: 1,
                tsc_deadline: false,
                hidden: &hidden,
            },
        );
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ecx & ((1 << 26) | (1 << 27) | (1 << 28) | (1 << 13)), 0);
        let l7 = find(&c, 7, 0);
        assert_eq!(l7.ebx, 1, "AVX2/AVX512F gone, other bits kept");
        assert_eq!(find(&c, 0xd, 0).eax, 0);
        assert_eq!(find(&c, 0xd, 1).eax, 0);
        assert_eq!(find(&c, 0xa, 0).eax, 0x0730_0404, "PMU untouched");
    }

    #[test]
    fn hiding_pmu_zeroes_leaf_a() {
        let mut c = sample();
        normalize(
            &mut c,
            &CpuidSpec {
                vcpu_id: 0,
                vcpus: 1,
                tsc_deadline: false,
                hidden: &[CpuFeature::Pmu],
            },
        );
        assert_eq!(find(&c, 0xa, 0).eax, 0);
    }

    #[test]
    fn still_visible_reports_forced_flags() {
        let mut c = sample();
        let hidden = [CpuFeature::Xsave, CpuFeature::Cx16];
        assert_eq!(still_visible(&c, &hidden), hidden.to_vec());
        normalize(
            &mut c,
            &CpuidSpec {
                vcpu_id: 0,
                vcpus: 1,
                tsc_deadline: false,
                hidden: &hidden,
            },
        );
        assert!(still_visible(&c, &hidden).is_empty());
    }

    #[test]
    fn feature_list_parsing() {
        assert_eq!(
            parse_features("xsave, CX16").unwrap(),
            vec![CpuFeature::Xsave, CpuFeature::Cx16]
        );
        assert_eq!(parse_features("").unwrap(), vec![]);
        assert_eq!(
            parse_features("sse9"),
            Err(CpuidError::UnknownFeature("sse9".into()))
        );
    }
}
