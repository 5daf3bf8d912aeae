//! A BERT encoder forward pass (MiniLM-L6-H384: 6 layers, 12 heads, hidden 384, FFN 1536) over *packed*
//! sequences, then sentence-transformers' mean pooling and L2 normalisation.
//!
//! Packing: the token rows of every text in a batch are stacked into one `[tokens × hidden]` matrix, so each
//! linear layer is one matrix product over all texts at once with no padding rows; only attention, which must not
//! cross texts, runs per text and head on its own slice. The result equals running every text alone (no attention
//! mask is needed: there are no padded positions to mask).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use half::f16;
use serde::Deserialize;

use super::LoadError;
use super::bf16::PackedWeight;

/// `config.json` fields the forward pass depends on; anything else in the file is ignored.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct BertConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

/// A linear layer `y = x Wᵀ + b` with PyTorch's `[out × in]` weight layout: f32, or packed bf16 (then `weight` is
/// empty).
struct Linear {
    weight: Vec<f32>,
    packed: Option<PackedWeight>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl Linear {
    /// The same layer with its weight in `precision`: bf16 packs it (dropping the f32 copy) when the shape fits.
    fn in_precision(mut self, precision: Precision) -> Self {
        if precision == Precision::Bf16 {
            self.packed = PackedWeight::pack(&self.weight, self.outputs, self.inputs);
            if self.packed.is_some() {
                self.weight = Vec::new();
            }
        }
        self
    }

    fn weight_bytes(&self) -> usize {
        self.weight.len() * 4 + self.packed.as_ref().map_or(0, PackedWeight::bytes)
    }
}

/// The arithmetic of the linear layers (`EMBEDDING_PRECISION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout (the reference).
    F32,
    /// bf16 weights and activations in the linear layers, f32 accumulation and everything else (AVX-512 BF16).
    Bf16,
}

impl Precision {
    /// bf16 when this CPU has AVX-512 BF16, else f32.
    pub fn fastest() -> Self {
        if super::bf16::supported() {
            Self::Bf16
        } else {
            Self::F32
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    /// Query, key and value fused into one `[3·hidden × hidden]` product.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub(crate) struct Bert {
    config: BertConfig,
    eps: f32,
    /// The word-piece embedding table in half precision: half of the model's weights are this table, and a row is
    /// only ever looked up (never multiplied), so f16 halves the model's memory (−23 MB) for a change in the vectors
    /// at the 1e-5 level (cosine with the f64 reference still > 0.9999).
    word: Vec<f16>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
}

/// The F32 tensors of a `.safetensors` file (u64 header length, JSON header, raw little-endian data), read one at a
/// time as they are taken: loading never holds the whole file next to the converted weights.
struct Tensors<R> {
    reader: R,
    /// Where the data section starts.
    data_start: u64,
    data_len: u64,
    headers: HashMap<String, TensorHeader>,
}

#[derive(Deserialize)]
struct TensorHeader {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The header is JSON of a few KB; anything larger is not a model file.
const MAX_HEADER_BYTES: u64 = 16 * 1024 * 1024;

fn bad(why: String) -> LoadError {
    LoadError::Invalid(format!("model.safetensors: {why}"))
}

impl<R: Read + Seek> Tensors<R> {
    fn parse(mut reader: R) -> Result<Self, LoadError> {
        let total = reader
            .seek(SeekFrom::End(0))
            .map_err(|e| bad(e.to_string()))?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| bad(e.to_string()))?;
        let mut len = [0u8; 8];
        reader
            .read_exact(&mut len)
            .map_err(|_| bad("shorter than its header".into()))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > total {
            return Err(bad(format!("a header of {header_len} bytes")));
        }
        let mut header = vec![0u8; header_len as usize];
        reader
            .read_exact(&mut header)
            .map_err(|e| bad(e.to_string()))?;
        let entries: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let mut headers = HashMap::new();
        for (name, value) in entries {
            if name == "__metadata__" {
                continue;
            }
            let header: TensorHeader =
                serde_json::from_value(value).map_err(|e| bad(format!("{name}: {e}")))?;
            headers.insert(name, header);
        }
        Ok(Self {
            reader,
            data_start: 8 + header_len,
            data_len: total - 8 - header_len,
            headers,
        })
    }

    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        self.take_as(name, shape, |v| v)
    }

    /// [`Tensors::take`], each value converted by `convert` as it is read.
    fn take_as<T>(
        &mut self,
        name: &str,
        shape: &[usize],
        convert: impl Fn(f32) -> T,
    ) -> Result<Vec<T>, LoadError> {
        let header = self.headers.remove(name).ok_or_else(|| {
            LoadError::Invalid(format!("model.safetensors has no tensor `{name}`"))
        })?;
        if header.dtype != "F32" || header.shape != shape {
            return Err(LoadError::Invalid(format!(
                "tensor `{name}` is {} {:?}; the config implies F32 {shape:?}",
                header.dtype, header.shape
            )));
        }
        let [start, end] = header.data_offsets;
        let count: usize = shape.iter().product();
        if start > end || end > self.data_len || end - start != count as u64 * 4 {
            return Err(bad(format!(
                "{name}: data offsets {start}..{end} do not hold {count} floats"
            )));
        }
        self.reader
            .seek(SeekFrom::Start(self.data_start + start))
            .map_err(|e| bad(e.to_string()))?;
        let mut values = Vec::with_capacity(count);
        let mut buf = vec![0u8; (1 << 20).min(count * 4)];
        while values.len() < count {
            let want = ((count - values.len()) * 4).min(buf.len());
            self.reader
                .read_exact(&mut buf[..want])
                .map_err(|e| bad(format!("{name}: {e}")))?;
            values.extend(
                buf[..want]
                    .chunks_exact(4)
                    .map(|b| convert(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            );
        }
        Ok(values)
    }

    fn linear(&mut self, prefix: &str, outputs: usize, inputs: usize) -> Result<Linear, LoadError> {
        Ok(Linear {
            weight: self.take(&format!("{prefix}.weight"), &[outputs, inputs])?,
            packed: None,
            bias: self.take(&format!("{prefix}.bias"), &[outputs])?,
            inputs,
            outputs,
        })
    }

    fn norm(&mut self, prefix: &str, size: usize) -> Result<LayerNorm, LoadError> {
        Ok(LayerNorm {
            weight: self.take(&format!("{prefix}.weight"), &[size])?,
            bias: self.take(&format!("{prefix}.bias"), &[size])?,
        })
    }
}

impl Bert {
    pub(crate) fn load(
        config: BertConfig,
        weights: &Path,
        precision: Precision,
    ) -> Result<Self, LoadError> {
        let file = std::fs::File::open(weights).map_err(|e| LoadError::io(weights, e))?;
        Self::from_safetensors(config, std::io::BufReader::new(file), precision)
    }

    pub(crate) fn from_safetensors(
        config: BertConfig,
        reader: impl Read + Seek,
        precision: Precision,
    ) -> Result<Self, LoadError> {
        if precision == Precision::Bf16 && !super::bf16::supported() {
            return Err(LoadError::Invalid(
                "EMBEDDING_PRECISION=bf16 needs AVX-512 BF16, which this CPU lacks (use auto or f32)".into(),
            ));
        }
        if config.hidden_act != "gelu" {
            return Err(LoadError::Invalid(format!(
                "hidden_act `{}` is not supported (only BERT's erf `gelu`)",
                config.hidden_act
            )));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(LoadError::Invalid(format!(
                "hidden size {} does not split into {} heads",
                config.hidden_size, config.num_attention_heads
            )));
        }
        let mut t = Tensors::parse(reader)?;
        let h = config.hidden_size;
        let word = t.take_as(
            "embeddings.word_embeddings.weight",
            &[config.vocab_size, h],
            f16::from_f32,
        )?;
        let position = t.take(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let token_type = t.take(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let embedding_norm = t.norm("embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let q = t.linear(&format!("{p}.attention.self.query"), h, h)?;
            let k = t.linear(&format!("{p}.attention.self.key"), h, h)?;
            let v = t.linear(&format!("{p}.attention.self.value"), h, h)?;
            let qkv = Linear {
                weight: [q.weight, k.weight, v.weight].concat(),
                packed: None,
                bias: [q.bias, k.bias, v.bias].concat(),
                inputs: h,
                outputs: 3 * h,
            };
            layers.push(Layer {
                qkv: qkv.in_precision(precision),
                attention_out: t
                    .linear(&format!("{p}.attention.output.dense"), h, h)?
                    .in_precision(precision),
                attention_norm: t.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                intermediate: t
                    .linear(
                        &format!("{p}.intermediate.dense"),
                        config.intermediate_size,
                        h,
                    )?
                    .in_precision(precision),
                output: t
                    .linear(&format!("{p}.output.dense"), h, config.intermediate_size)?
                    .in_precision(precision),
                output_norm: t.norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        Ok(Self {
            eps: config.layer_norm_eps as f32,
            config,
            word,
            position,
            token_type,
            embedding_norm,
            layers,
        })
    }

    /// Bytes of the linear layers' weights (f32, or packed bf16).
    pub(crate) fn linear_weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.qkv.weight_bytes()
                    + l.attention_out.weight_bytes()
                    + l.intermediate.weight_bytes()
                    + l.output.weight_bytes()
            })
            .sum()
    }

    pub(crate) fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub(crate) fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Mean-pooled, L2-normalised sentence vectors for token-id sequences (each already `[CLS] … [SEP]` and no
    /// longer than [`Bert::max_positions`]; ids below [`Bert::vocab_size`]). Zero-length sequences are refused.
    pub(crate) fn embed(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        let h = self.config.hidden_size;
        let mut spans = Vec::with_capacity(sequences.len());
        let mut total = 0;
        for seq in sequences {
            if seq.is_empty() || seq.len() > self.config.max_position_embeddings {
                return Err(format!(
                    "a sequence of {} tokens (1..={} allowed)",
                    seq.len(),
                    self.config.max_position_embeddings
                ));
            }
            spans.push((total, seq.len()));
            total += seq.len();
        }
        // Embeddings: word + position + token type 0, then LayerNorm.
        let mut x = vec![0.0f32; total * h];
        for (seq, &(start, _)) in sequences.iter().zip(&spans) {
            for (pos, &id) in seq.iter().enumerate() {
                let id = id as usize;
                if id >= self.config.vocab_size {
                    return Err(format!("token id {id} outside the vocabulary"));
                }
                let row = &mut x[(start + pos) * h..(start + pos + 1) * h];
                let word = &self.word[id * h..(id + 1) * h];
                let position = &self.position[pos * h..(pos + 1) * h];
                for j in 0..h {
                    row[j] = word[j].to_f32() + position[j] + self.token_type[j];
                }
            }
        }
        layer_norm(&mut x, h, &self.embedding_norm, self.eps);

        let longest = spans.iter().map(|&(_, len)| len).max().unwrap_or(0);
        let mut scratch = Scratch::new(total, longest, h, self.config.intermediate_size);
        for layer in &self.layers {
            self.layer(layer, &mut x, &spans, &mut scratch);
        }

        let mut vectors = Vec::with_capacity(spans.len());
        for &(start, len) in &spans {
            let mut pooled = vec![0.0f32; h];
            for row in x[start * h..(start + len) * h].chunks_exact(h) {
                for (p, v) in pooled.iter_mut().zip(row) {
                    *p += v;
                }
            }
            let scale = 1.0 / len as f32;
            pooled.iter_mut().for_each(|p| *p *= scale);
            let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            if !norm.is_finite() {
                return Err("the model produced a non-finite vector".into());
            }
            pooled.iter_mut().for_each(|p| *p /= norm);
            vectors.push(pooled);
        }
        Ok(vectors)
    }

    fn layer(&self, layer: &Layer, x: &mut [f32], spans: &[(usize, usize)], s: &mut Scratch) {
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let head_dim = h / heads;
        let rows = x.len() / h;
        let scale = 1.0 / (head_dim as f32).sqrt();

        linear(x, rows, &layer.qkv, &mut s.qkv, &mut s.pairs);
        let stride = 3 * h;
        for &(start, len) in spans {
            let scores = &mut s.scores[..len * len];
            for head in 0..heads {
                let q = &s.qkv[start * stride + head * head_dim..];
                let k = &s.qkv[start * stride + h + head * head_dim..];
                let v = &s.qkv[start * stride + 2 * h + head * head_dim..];
                // scores[len × len] = Q · Kᵀ · scale
                // SAFETY: every matrix is addressed within its slice: Q and K rows `start..start+len`, columns
                // `head·d..(head+1)·d` of the `[rows × 3h]` qkv buffer; scores is `len × len`.
                unsafe {
                    matrixmultiply::sgemm(
                        len,
                        head_dim,
                        len,
                        scale,
                        q.as_ptr(),
                        stride as isize,
                        1,
                        k.as_ptr(),
                        1,
                        stride as isize,
                        0.0,
                        scores.as_mut_ptr(),
                        len as isize,
                        1,
                    );
                }
                for row in scores.chunks_exact_mut(len) {
                    softmax(row);
                }
                let out = &mut s.context[start * h + head * head_dim..];
                // context[len × d] = P · V, written into the head's columns of the `[rows × h]` context.
                // SAFETY: as above; the output block is rows `start..start+len`, columns of this head.
                unsafe {
                    matrixmultiply::sgemm(
                        len,
                        len,
                        head_dim,
                        1.0,
                        scores.as_ptr(),
                        len as isize,
                        1,
                        v.as_ptr(),
                        stride as isize,
                        1,
                        0.0,
                        out.as_mut_ptr(),
                        h as isize,
                        1,
                    );
                }
            }
        }
        linear(
            &s.context,
            rows,
            &layer.attention_out,
            &mut s.projected,
            &mut s.pairs,
        );
        add_in_place(x, &s.projected);
        layer_norm(x, h, &layer.attention_norm, self.eps);

        linear(
            x,
            rows,
            &layer.intermediate,
            &mut s.intermediate,
            &mut s.pairs,
        );
        s.intermediate.iter_mut().for_each(|v| *v = gelu(*v));
        linear(
            &s.intermediate,
            rows,
            &layer.output,
            &mut s.projected,
            &mut s.pairs,
        );
        add_in_place(x, &s.projected);
        layer_norm(x, h, &layer.output_norm, self.eps);
    }
}

/// Buffers one forward pass reuses across layers.
struct Scratch {
    qkv: Vec<f32>,
    context: Vec<f32>,
    projected: Vec<f32>,
    intermediate: Vec<f32>,
    scores: Vec<f32>,
    /// A linear layer's input as bf16 pairs (bf16 only).
    pairs: Vec<u32>,
}

impl Scratch {
    fn new(rows: usize, longest: usize, hidden: usize, intermediate: usize) -> Self {
        Self {
            qkv: vec![0.0; rows * 3 * hidden],
            context: vec![0.0; rows * hidden],
            projected: vec![0.0; rows * hidden],
            intermediate: vec![0.0; rows * intermediate],
            scores: vec![0.0; longest * longest],
            pairs: Vec::new(),
        }
    }
}

/// `out[rows × outputs] = x[rows × inputs] · Wᵀ + b`; `pairs` is the bf16 path's scratch.
fn linear(x: &[f32], rows: usize, layer: &Linear, out: &mut Vec<f32>, pairs: &mut Vec<u32>) {
    if let Some(packed) = &layer.packed {
        packed.forward(x, rows, &layer.bias, out, pairs);
        return;
    }
    out.resize(rows * layer.outputs, 0.0);
    for row in out.chunks_exact_mut(layer.outputs) {
        row.copy_from_slice(&layer.bias);
    }
    debug_assert_eq!(x.len(), rows * layer.inputs);
    // SAFETY: x is `rows × inputs` row-major, the weight `outputs × inputs` row-major (read transposed through its
    // strides), out `rows × outputs` row-major; all three lengths are checked above / sized by resize.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            layer.inputs,
            layer.outputs,
            1.0,
            x.as_ptr(),
            layer.inputs as isize,
            1,
            layer.weight.as_ptr(),
            1,
            layer.inputs as isize,
            1.0,
            out.as_mut_ptr(),
            layer.outputs as isize,
            1,
        );
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

fn layer_norm(x: &mut [f32], width: usize, norm: &LayerNorm, eps: f32) {
    for row in x.chunks_exact_mut(width) {
        let mean = row.iter().sum::<f32>() / width as f32;
        let variance = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / width as f32;
        let inv = 1.0 / (variance + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

/// BERT's exact GELU: `x · Φ(x)` with the error function (not the tanh approximation).
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The error function as a rational polynomial on `[-4, 4]` (Eigen's `generic_fast_erf_float`; erf(±4) is ±1 in
/// f32): no branch, no `exp`, so the GELU loop vectorises. libm's `erff` took a fifth of the inference time (perf);
/// this one agrees with it to 1e-6 (test below). Plain multiply-adds: `mul_add` without the FMA target feature is a
/// call per element.
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_6e-3;
    p = x2 * p - 1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329e-3;
    q = x2 * q - 1.426_473_9e-2;
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_erf_agrees_with_libm() {
        let mut worst = 0.0f32;
        for i in -100_000..=100_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((erf(x) - libm::erff(x)).abs());
        }
        assert!(worst < 1e-6, "max |erf - erff| = {worst}");
    }

    #[test]
    fn gelu_and_softmax_match_their_definitions() {
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-3.0) + 0.004_049_7).abs() < 1e-6);
        let mut row = [1.0, 2.0, 3.0];
        softmax(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((row[2] - 0.665_240_9).abs() < 1e-6);
    }

    #[test]
    fn a_truncated_or_foreign_weights_file_is_an_error_not_a_panic() {
        let config: BertConfig = serde_json::from_str(
            r#"{"hidden_size":4,"num_attention_heads":2,"num_hidden_layers":1,"intermediate_size":8,
                "max_position_embeddings":8,"vocab_size":10,"type_vocab_size":2,"layer_norm_eps":1e-12,
                "hidden_act":"gelu"}"#,
        )
        .unwrap();
        for bytes in [
            &b""[..],
            b"\xff\xff\xff\xff\xff\xff\xff\x7f{}",
            b"\x02\0\0\0\0\0\0\0{}",
        ] {
            assert!(
                Bert::from_safetensors(config.clone(), std::io::Cursor::new(bytes), Precision::F32)
                    .is_err()
            );
        }
    }
}
