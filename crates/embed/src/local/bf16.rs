//! Linear layers in bfloat16 on AVX-512 BF16 (`vdpbf16ps`): `EMBEDDING_PRECISION=bf16`, or `auto` on a CPU that has
//! it.
//!
//! The weights are converted once, at load, to bf16 (round to nearest even) and packed for the kernel: for each block
//! of 16 outputs and each pair of inputs `(2p, 2p+1)`, one 64-byte vector holding the pair for the 16 outputs. A
//! forward pass converts the activations to bf16 pairs the same way and multiplies with `vdpbf16ps`, which adds both
//! products of a pair to an f32 accumulator; the bias and everything after the product stay f32. Half the weight
//! bytes of f32 (the f32 copy is dropped) and twice the multiply-adds per instruction; bf16 keeps f32's exponent, so
//! nothing overflows, and the 8-bit mantissa moves the sentence vectors by ~1e-3 (cosine to the f32 reference on the
//! golden texts is checked in `crates/embed/tests/local_model.rs`).
//!
//! A plain loop over `std::arch` intrinsics: the one GEMM crate that is maintained and has a bf16 path (`gemm`)
//! converts bf16 to f32 before multiplying on x86, which saves memory but no time.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of activations per tile (each with two accumulators of 16 outputs).
const ROWS: usize = 4;

/// Whether this CPU runs the bf16 kernel.
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a `[outputs × inputs]` layer fits the kernel: 32 outputs per pair of blocks, inputs in pairs.
pub(crate) fn fits(outputs: usize, inputs: usize) -> bool {
    outputs.is_multiple_of(32) && inputs.is_multiple_of(2) && inputs > 0
}

/// `value` as bf16 bits, rounded to nearest even (NaN stays NaN).
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Two values as one 32-bit lane of bf16 pairs (the even element in the low half).
fn pair(even: f32, odd: f32) -> u32 {
    u32::from(bf16_bits(even)) | (u32::from(bf16_bits(odd)) << 16)
}

/// A `[outputs × inputs]` weight (PyTorch's layout) packed for the kernel.
pub(crate) struct PackedWeight {
    lanes: Vec<u32>,
    inputs: usize,
    outputs: usize,
}

impl PackedWeight {
    /// Packs `weight` (`[outputs × inputs]`, row-major); `None` when the shape does not [`fits`].
    pub(crate) fn pack(weight: &[f32], outputs: usize, inputs: usize) -> Option<Self> {
        if !fits(outputs, inputs) || weight.len() != outputs * inputs {
            return None;
        }
        let pairs = inputs / 2;
        let mut lanes = Vec::with_capacity(outputs * pairs);
        for block in 0..outputs / 16 {
            for p in 0..pairs {
                for j in 0..16 {
                    let row = &weight[(block * 16 + j) * inputs..][..inputs];
                    lanes.push(pair(row[2 * p], row[2 * p + 1]));
                }
            }
        }
        Some(Self {
            lanes,
            inputs,
            outputs,
        })
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.lanes.len() * 4
    }

    /// `out[rows × outputs] = x[rows × inputs] · Wᵀ + bias`; `pairs` is scratch for the converted activations.
    ///
    /// Callers check [`supported`] before packing (a `PackedWeight` exists only on a CPU that runs the kernel).
    pub(crate) fn forward(
        &self,
        x: &[f32],
        rows: usize,
        bias: &[f32],
        out: &mut Vec<f32>,
        pairs: &mut Vec<u32>,
    ) {
        assert_eq!(x.len(), rows * self.inputs, "activations' shape");
        assert_eq!(bias.len(), self.outputs, "bias' shape");
        pairs.clear();
        pairs.extend(x.chunks_exact(2).map(|p| pair(p[0], p[1])));
        out.clear();
        out.resize(rows * self.outputs, 0.0);
        #[cfg(target_arch = "x86_64")]
        if supported() {
            // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked just above); the slices' lengths are those the
            // kernel indexes: pairs `rows × inputs/2`, lanes `outputs × inputs/2`, bias `outputs`, out
            // `rows × outputs` (asserted and sized above).
            unsafe { kernel(pairs, rows, self, bias, out) };
            return;
        }
        self.reference(pairs, rows, bias, out);
    }

    /// The same product in scalar code over the same bf16 values: what the kernel must equal (tests), and the path
    /// on a CPU without the instructions.
    fn reference(&self, pairs: &[u32], rows: usize, bias: &[f32], out: &mut [f32]) {
        let k = self.inputs / 2;
        let widen = |bits: u32| f32::from_bits(bits << 16);
        for m in 0..rows {
            for n in 0..self.outputs {
                let (block, j) = (n / 16, n % 16);
                let mut sum = 0.0f32;
                for p in 0..k {
                    let a = pairs[m * k + p];
                    let w = self.lanes[(block * k + p) * 16 + j];
                    sum += widen(a & 0xFFFF) * widen(w & 0xFFFF) + widen(a >> 16) * widen(w >> 16);
                }
                out[m * self.outputs + n] = sum + bias[n];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(pairs: &[u32], rows: usize, weight: &PackedWeight, bias: &[f32], out: &mut [f32]) {
    let k = weight.inputs / 2;
    // Outer: a pair of output blocks (its weights, 128 bytes per input pair, stay in L1 while every row streams by).
    for block in (0..weight.outputs / 16).step_by(2) {
        let mut m = 0;
        while m + ROWS <= rows {
            // SAFETY: as `forward` states; rows m..m+ROWS exist.
            unsafe { tile::<ROWS>(pairs, m, k, weight, block, bias, out) };
            m += ROWS;
        }
        while m < rows {
            // SAFETY: row m exists.
            unsafe { tile::<1>(pairs, m, k, weight, block, bias, out) };
            m += 1;
        }
    }
}

/// Rows `m..m+R` times output blocks `block` and `block+1`, into `out` with the bias added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize>(
    pairs: &[u32],
    m: usize,
    k: usize,
    weight: &PackedWeight,
    block: usize,
    bias: &[f32],
    out: &mut [f32],
) {
    let outputs = weight.outputs;
    let mut low = [_mm512_setzero_ps(); R];
    let mut high = [_mm512_setzero_ps(); R];
    // SAFETY (every pointer below): block+1 < outputs/16, p < k, m+r < rows: inside lanes, pairs, bias and out.
    unsafe {
        let w0 = weight.lanes.as_ptr().add(block * k * 16);
        let w1 = weight.lanes.as_ptr().add((block + 1) * k * 16);
        let a = pairs.as_ptr().add(m * k);
        for p in 0..k {
            let v0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w0.add(p * 16).cast()));
            let v1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w1.add(p * 16).cast()));
            for r in 0..R {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * k + p) as i32));
                low[r] = _mm512_dpbf16_ps(low[r], x, v0);
                high[r] = _mm512_dpbf16_ps(high[r], x, v1);
            }
        }
        let b0 = _mm512_loadu_ps(bias.as_ptr().add(block * 16));
        let b1 = _mm512_loadu_ps(bias.as_ptr().add(block * 16 + 16));
        for r in 0..R {
            let row = out.as_mut_ptr().add((m + r) * outputs + block * 16);
            _mm512_storeu_ps(row, _mm512_add_ps(low[r], b0));
            _mm512_storeu_ps(row.add(16), _mm512_add_ps(high[r], b1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (x % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and the next bf16 (1 + 2^-7): ties go to the even one, 1.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(bf16_bits(-2.0), 0xC000);
        assert!(f32::from_bits(u32::from(bf16_bits(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn the_kernel_equals_the_scalar_product_of_the_same_bf16_values_and_is_near_f32() {
        let (outputs, inputs) = (64, 48);
        let weight = values(outputs * inputs, 7);
        let bias = values(outputs, 11);
        let packed = PackedWeight::pack(&weight, outputs, inputs).unwrap();
        assert_eq!(packed.bytes(), outputs * inputs * 2);
        for rows in [1, 3, 4, 9] {
            let x = values(rows * inputs, rows as u32);
            let (mut out, mut pairs) = (Vec::new(), Vec::new());
            packed.forward(&x, rows, &bias, &mut out, &mut pairs);
            let mut reference = vec![0.0; rows * outputs];
            packed.reference(&pairs, rows, &bias, &mut reference);
            for (got, want) in out.iter().zip(&reference) {
                assert!((got - want).abs() < 1e-4, "{got} vs {want} ({rows} rows)");
            }
            for m in 0..rows {
                for n in 0..outputs {
                    let exact: f32 = (0..inputs)
                        .map(|i| x[m * inputs + i] * weight[n * inputs + i])
                        .sum::<f32>()
                        + bias[n];
                    let got = out[m * outputs + n];
                    assert!((got - exact).abs() < 0.05, "{got} vs f32 {exact}");
                }
            }
        }
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_not_packed() {
        assert!(PackedWeight::pack(&[0.0; 16 * 4], 16, 4).is_none());
        assert!(PackedWeight::pack(&[0.0; 32 * 3], 32, 3).is_none());
        assert!(PackedWeight::pack(&[0.0; 10], 32, 4).is_none());
    }
}
