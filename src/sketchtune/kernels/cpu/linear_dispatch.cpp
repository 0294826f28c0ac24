// y = x · Ŵᵀ (+ bias) on CPU in one call from Python: which kernel runs for how many tokens, decided here.
//
// Why: the choice (GEMV, AMX, bf16 dot products, tiles) used to be made in Python, about ten small calls per
// layer (~20 µs) — next to a 40 µs GEMV of one of SmolLM2's 576×1536 layers, half the layer's time again, and
// a decoding step calls 210 such layers. Here the whole inference path is one call; cpu_kernels.py keeps only
// the checks that need Python (kernels enabled, Triton's interpreter not asked for).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>

// lut_gemv.cpp, amx_linear.cpp, bf16_dot.cpp, bf16_gemv.cpp, tiles.cpp
torch::Tensor lut_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                       int64_t in_features, int64_t isa);
torch::Tensor linear_tiled(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                           int64_t in_features, int64_t isa);
bool has_bf16_dot();
torch::Tensor linear_bf16_dot(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                              int64_t in_features);
bool has_amx();
torch::Tensor linear_amx(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                         int64_t in_features);
bool bf16_gemv_fits(int64_t in_features, int64_t gpr);
torch::Tensor linear_bf16_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                               int64_t in_features);

namespace {

// Token-count limits, measured on one thread (see cpu_kernels.py, which exposes them).
constexpr int64_t kGemvMaxTokens = 16;   // fp32: the GEMV beats the fp32 tiles up to ~16 tokens
constexpr int64_t kBf16GemvTokens = 4;   // bf16 with the dot kernel: it matches the GEMV at 4 tokens
constexpr int64_t kAmxGemvTokens = 3;    // bf16 with AMX: at 4 tokens AMX took 0.6× the GEMV's time on
                                         // 2048²–4096², 1.0–1.6× on 576↔1536
constexpr int64_t kAmxMaxTokens = 64;    // at 256 tokens the tiles took 0.57–0.71× AMX's time
constexpr int64_t kDotMaxTokens = 32;    // at 64 tokens the tiles beat the dot kernel

enum class Kernel { kGemv, kBf16Gemv, kAmx, kDot, kTiles };

bool amx_runs(int64_t isa) { return isa == 0 && has_amx(); }
bool dot_runs(int64_t isa) { return (isa == 0 || isa == 2) && has_bf16_dot(); }

}  // namespace

// Up to how many tokens the GEMV is the fastest kernel (cpu_kernels.gemv_tokens asks this).
int64_t gemv_max_tokens(bool bf16, int64_t isa) {
  if (!bf16) return kGemvMaxTokens;
  return amx_runs(isa) ? kAmxGemvTokens : dot_runs(isa) ? kBf16GemvTokens : kGemvMaxTokens;
}

namespace {

Kernel pick(int64_t tokens, bool bf16, int64_t in, int64_t gpr, int64_t isa) {
  // bf16 tokens: the bf16 GEMV (bf16 Ŵ, as the reference) where the layer's groups suit it, else the fp32 one
  if (tokens <= gemv_max_tokens(bf16, isa))
    return bf16 && (isa == 0 || isa == 2) && bf16_gemv_fits(in, gpr) ? Kernel::kBf16Gemv : Kernel::kGemv;
  if (!bf16) return Kernel::kTiles;
  const bool amx = amx_runs(isa), dot = dot_runs(isa);
  if (amx && tokens <= kAmxMaxTokens && in % 32 == 0) return Kernel::kAmx;
  if (dot && tokens <= kDotMaxTokens) return Kernel::kDot;
  return Kernel::kTiles;
}

}  // namespace

std::string linear_kernel(int64_t tokens, bool bf16, int64_t in_features, int64_t gpr, int64_t isa) {
  switch (pick(tokens, bf16, in_features, gpr, isa)) {
    case Kernel::kGemv: return "gemv";
    case Kernel::kBf16Gemv: return "bf16_gemv";
    case Kernel::kAmx: return "amx";
    case Kernel::kDot: return "bf16_dot";
    default: return "tiles";
  }
}

// x (..., in) fp32 or bf16 → y (..., out) in x's dtype.
torch::Tensor linear_cpu(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook,
                         c10::optional<torch::Tensor> bias, int64_t bits, int64_t in_features, int64_t isa) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(x.size(-1) == in_features, "x's last dimension must be in_features");
  TORCH_CHECK(codebook.dim() == 3, "codebook must be (out, gpr, 2^bits)");
  const auto x2d = x.reshape({-1, in_features});
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  torch::Tensor y;
  switch (pick(x2d.size(0), bf16, in_features, codebook.size(1), isa)) {
    case Kernel::kGemv: y = lut_gemv(x2d, packed, codebook, bits, in_features, isa); break;
    case Kernel::kBf16Gemv: y = linear_bf16_gemv(x2d, packed, codebook, bits, in_features); break;
    case Kernel::kAmx: y = linear_amx(x2d, packed, codebook, bits, in_features); break;
    case Kernel::kDot: y = linear_bf16_dot(x2d, packed, codebook, bits, in_features); break;
    default: y = linear_tiled(x2d, packed, codebook, bits, in_features, isa); break;
  }
  if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
  if (bias.has_value() && bias->defined()) y.add_(bias->to(y.scalar_type()));
  auto shape = x.sizes().vec();
  shape.back() = packed.size(0);
  return y.view(shape);
}

// How many distinct threads at::parallel_for used for `tasks` one-element tasks: what the kernels' row split gets
// (a test checks it follows torch.set_num_threads; an extension built without OpenMP runs them all on one).
int64_t parallel_threads(int64_t tasks) {
  std::set<std::thread::id> seen;
  std::mutex lock;
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    std::lock_guard<std::mutex> guard(lock);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}
