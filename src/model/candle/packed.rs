//! A BERT encoder for the CPU over packed tokens: the rows of a batch are
//! laid end to end with no padding, so the dense layers (three quarters of
//! the time) compute only real tokens, and attention runs per row over its
//! own tokens, with no mask. Beside that: one matrix product for Q, K and V,
//! bias, activation and residual applied in place on one set of buffers
//! reused across layers, and an exact GELU whose erf vectorises (the
//! library's is a scalar call per element).
//!
//! It computes what candle's BERT computes (`tests/minilm.rs` holds it to
//! the float64 reference within 1e-4 cosine); the matrix products are the
//! same `gemm` kernels. CUDA keeps candle's model.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use gemm::Parallelism;

/// Shapes read from config.json.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub max_positions: usize,
    pub eps: f32,
}

/// y = x·Wᵀ + b with W as stored ([out][in]).
struct Linear {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    /// Query, key and value stacked: one product instead of three.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    up: Linear,
    down: Linear,
    output_norm: LayerNorm,
}

/// The encoder's weights.
pub struct PackedBert {
    dims: Dims,
    words: Vec<f32>,
    positions: Vec<f32>,
    /// Token type 0's embedding: Kiln embeds single texts.
    token_type: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    /// Threads per computation: 0 follows RAYON_NUM_THREADS, as candle.
    threads: AtomicUsize,
    /// Its own pool for more than one thread, so the choice holds whatever
    /// size rayon's global pool has.
    pool: std::sync::OnceLock<Option<rayon::ThreadPool>>,
}

fn flat(t: Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn linear(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Linear> {
    Ok(Linear {
        weight: flat(vb.get((outputs, inputs), "weight")?)?,
        bias: flat(vb.get(outputs, "bias")?)?,
        inputs,
        outputs,
    })
}

fn layer_norm(vb: &VarBuilder, size: usize) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm { gamma: flat(vb.get(size, "weight")?)?, beta: flat(vb.get(size, "bias")?)? })
}

impl PackedBert {
    /// Reads the weights under `vb` (with or without a `bert.` prefix, as
    /// checkpoints differ).
    pub fn load(vb: VarBuilder, dims: Dims, vocab: usize, type_vocab: usize) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let h = dims.hidden;
        let e = vb.pp("embeddings");
        let token_types = flat(e.get((type_vocab, h), "token_type_embeddings.weight")?)?;
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let (q, k, v) = (
                linear(&l.pp("attention.self.query"), h, h)?,
                linear(&l.pp("attention.self.key"), h, h)?,
                linear(&l.pp("attention.self.value"), h, h)?,
            );
            let qkv = Linear {
                weight: [q.weight, k.weight, v.weight].concat(),
                bias: [q.bias, k.bias, v.bias].concat(),
                inputs: h,
                outputs: 3 * h,
            };
            layers.push(Layer {
                qkv,
                attention_out: linear(&l.pp("attention.output.dense"), h, h)?,
                attention_norm: layer_norm(&l.pp("attention.output.LayerNorm"), h)?,
                up: linear(&l.pp("intermediate.dense"), h, dims.intermediate)?,
                down: linear(&l.pp("output.dense"), dims.intermediate, h)?,
                output_norm: layer_norm(&l.pp("output.LayerNorm"), h)?,
            });
        }
        Ok(Self {
            dims,
            words: flat(e.get((vocab, h), "word_embeddings.weight")?)?,
            positions: flat(e.get((dims.max_positions, h), "position_embeddings.weight")?)?,
            token_type: token_types[..h].to_vec(),
            embedding_norm: layer_norm(&e.pp("LayerNorm"), h)?,
            layers,
            threads: AtomicUsize::new(0),
            pool: std::sync::OnceLock::new(),
        })
    }

    /// Computes with `threads` threads from now on (at most the cores).
    pub fn set_threads(&self, threads: usize) {
        self.threads.store(threads.clamp(1, crate::model::threads::cores()), Ordering::Relaxed);
    }

    /// The last hidden state of every token of every row, rows end to end
    /// (`sum(len) × hidden`). Token ids must be below the vocabulary size
    /// and rows no longer than the position table (the tokenizer ensures
    /// both; a violation is an error, not a panic).
    pub fn forward(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>, String> {
        let threads = match self.threads.load(Ordering::Relaxed) {
            0 => candle_core::utils::get_num_threads(),
            n => n,
        };
        if threads <= 1 {
            return self.forward_with(rows, Parallelism::None);
        }
        let pool = self.pool.get_or_init(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(crate::model::threads::cores())
                .thread_name(|i| format!("kiln-encoder-{i}"))
                .build()
                .ok()
        });
        match pool {
            Some(pool) => pool.install(|| self.forward_with(rows, Parallelism::Rayon(threads))),
            None => self.forward_with(rows, Parallelism::Rayon(threads)),
        }
    }

    fn forward_with(&self, rows: &[Vec<u32>], threads: Parallelism) -> Result<Vec<f32>, String> {
        let d = self.dims;
        let h = d.hidden;
        let tokens: usize = rows.iter().map(Vec::len).sum();
        let mut x = vec![0f32; tokens * h];
        let mut t = 0;
        for row in rows {
            if row.len() > d.max_positions {
                return Err(format!("a row of {} tokens is over the {} positions", row.len(), d.max_positions));
            }
            for (position, &id) in row.iter().enumerate() {
                let word = self
                    .words
                    .get(id as usize * h..(id as usize + 1) * h)
                    .ok_or_else(|| format!("token id {id} is outside the vocabulary"))?;
                let pos = &self.positions[position * h..(position + 1) * h];
                let out = &mut x[t * h..(t + 1) * h];
                for j in 0..h {
                    out[j] = word[j] + pos[j] + self.token_type[j];
                }
                t += 1;
            }
        }
        normalize(&mut x, &self.embedding_norm, d.eps);
        let mut qkv = vec![0f32; tokens * 3 * h];
        let mut context = vec![0f32; tokens * h];
        let mut projected = vec![0f32; tokens * h];
        let mut wide = vec![0f32; tokens * d.intermediate];
        let mut scores = Vec::new();
        for layer in &self.layers {
            layer.qkv.apply(&x, tokens, &mut qkv, threads);
            attend(&qkv, rows, d, &mut context, &mut scores);
            layer.attention_out.apply(&context, tokens, &mut projected, threads);
            add_and_normalize(&mut x, &projected, &layer.attention_norm, d.eps);
            layer.up.apply(&x, tokens, &mut wide, threads);
            gelu(&mut wide);
            layer.down.apply(&wide, tokens, &mut projected, threads);
            add_and_normalize(&mut x, &projected, &layer.output_norm, d.eps);
        }
        Ok(x)
    }
}

impl Linear {
    /// `out = x·Wᵀ + b` for `rows` rows of `x`.
    fn apply(&self, x: &[f32], rows: usize, out: &mut [f32], threads: Parallelism) {
        let (k, n) = (self.inputs, self.outputs);
        assert!(x.len() >= rows * k && out.len() >= rows * n && self.weight.len() == n * k && self.bias.len() == n);
        for row in out[..rows * n].chunks_exact_mut(n) {
            row.copy_from_slice(&self.bias);
        }
        if rows == 0 {
            return;
        }
        // SAFETY: the assertion above bounds every pointer by its slice:
        // dst is rows×n row-major in `out`, lhs rows×k row-major in `x`,
        // and rhs[kk][j] = weight[j·k + kk] lies within the n×k weight.
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                self.weight.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                threads,
            );
        }
    }
}

/// Eight-lane dot product: the lanes let the compiler vectorise a sum it
/// may not reorder otherwise.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Self-attention of every row over its own tokens: no padding, no mask.
fn attend(qkv: &[f32], rows: &[Vec<u32>], d: Dims, context: &mut [f32], scores: &mut Vec<f32>) {
    let h = d.hidden;
    let head = h / d.heads;
    let scale = 1.0 / (head as f32).sqrt();
    let stride = 3 * h;
    let mut start = 0;
    for row in rows {
        let len = row.len();
        scores.resize(len, 0.0);
        for a in 0..d.heads {
            let offset = a * head;
            for i in 0..len {
                let q = &qkv[(start + i) * stride + offset..][..head];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let k = &qkv[(start + j) * stride + h + offset..][..head];
                    *s = dot(q, k) * scale;
                    max = max.max(*s);
                }
                let mut total = 0.0;
                for s in scores.iter_mut() {
                    *s = exp_nonpositive(*s - max);
                    total += *s;
                }
                let out = &mut context[(start + i) * h + offset..][..head];
                out.fill(0.0);
                for (j, s) in scores.iter().enumerate() {
                    let v = &qkv[(start + j) * stride + 2 * h + offset..][..head];
                    let p = s / total;
                    for (o, v) in out.iter_mut().zip(v) {
                        *o += p * v;
                    }
                }
            }
        }
        start += len;
    }
}

/// LayerNorm of every `gamma.len()`-wide token, in place.
fn normalize(x: &mut [f32], norm: &LayerNorm, eps: f32) {
    let h = norm.gamma.len();
    for token in x.chunks_exact_mut(h) {
        let mean = token.iter().sum::<f32>() / h as f32;
        let var = token.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in token.iter_mut().zip(&norm.gamma).zip(&norm.beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// `x = LayerNorm(x + residual)`, in place.
fn add_and_normalize(x: &mut [f32], residual: &[f32], norm: &LayerNorm, eps: f32) {
    for (v, r) in x.iter_mut().zip(residual) {
        *v += r;
    }
    normalize(x, norm, eps);
}

/// e^x for x ≤ 0 (softmax and erf only need that range), to about 2e-7
/// relative: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its Taylor series to
/// the seventh power, and 2^n put into the exponent bits. No branches and
/// no library call, so a loop of it vectorises.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Round to nearest by adding and taking away 1.5·2²³: plain adds, where
    // `round()` is a library call on baseline x86-64 and stops the loop
    // from vectorising.
    const ROUNDER: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUNDER) - ROUNDER;
    // ln 2 in two parts (Cody and Waite): n·HI is exact, so r keeps its
    // precision however large n is.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// erf(x) to 1.5e-7 absolute (Abramowitz and Stegun 7.1.26), 5e-7 in f32.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_nonpositive(-a * a);
    y.copysign(x)
}

/// Exact GELU, x·Φ(x), in place.
fn gelu(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Maclaurin series in f64, for |x| ≤ 3.
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_and_exp_are_within_their_stated_error() {
        for i in -3000..=3000 {
            let x = i as f32 / 1000.0;
            let err = (erf(x) as f64 - erf_series(x as f64)).abs();
            // A&S's 1.5e-7, plus float32 rounding.
            assert!(err < 5e-7, "erf({x}) off by {err}");
        }
        for i in 0..=8700 {
            let x = -(i as f32) / 100.0;
            let want = (x as f64).exp();
            let rel = ((exp_nonpositive(x) as f64 - want) / want).abs();
            assert!(rel < 1e-6, "exp({x}) off by {rel}");
        }
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn a_linear_layer_matches_the_plain_sum() {
        let (rows, k, n) = (3, 5, 4);
        let x: Vec<f32> = (0..rows * k).map(|i| i as f32 * 0.1 - 0.7).collect();
        let layer = Linear {
            weight: (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect(),
            bias: vec![0.5, -0.25, 0.0, 1.0],
            inputs: k,
            outputs: n,
        };
        let mut out = vec![0f32; rows * n];
        layer.apply(&x, rows, &mut out, Parallelism::None);
        for r in 0..rows {
            for j in 0..n {
                let want: f32 = layer.bias[j] + (0..k).map(|kk| x[r * k + kk] * layer.weight[j * k + kk]).sum::<f32>();
                assert!((out[r * n + j] - want).abs() < 1e-5, "({r},{j}): {} vs {want}", out[r * n + j]);
            }
        }
    }

    #[test]
    fn dot_handles_tails() {
        let a: Vec<f32> = (0..13).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..13).map(|i| (i * i) as f32).sum::<f32>());
    }
}
