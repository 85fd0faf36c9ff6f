// The partitions qwen3c offloads (targets/byoc.py), written once over a device interface that
// each vendor header implements (ascend_device.h, mlu_device.h).
//
// The host graph runs on the CPU, so every operand arrives as a host tensor: a partition copies
// its activations to the device, runs there and copies its results back. Weights are uploaded
// once and stay on the device (keyed by their host address, which is fixed once loaded). MoE
// routing's top-k and the grouping of rows by expert are bookkeeping over a few integers per
// token and run on the host; the softmax and every GEMM run on the device.
//
// A Device provides:
//   Buffer Alloc(size_t bytes);  void Upload(const void*, size_t, Buffer&);
//   void Download(const Buffer&, void*, size_t);
//   void Gemm(x, rows, k, x_dtype, w, w_offset_elems, n, w_dtype, y):
//       y[rows, n] (float32) = x · W[n, k]ᵀ, W starting w_offset_elems into w
//   void RmsNorm(x, rows, d, w, eps, dtype, y)     void SwiGlu(x, rows, i, dtype, y)
//   void Softmax(x, rows, e, y)  (float32)
#ifndef QWEN3C_PARTITIONS_H_
#define QWEN3C_PARTITIONS_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <unordered_map>
#include <vector>

namespace qwen3c {

using tvm::ffi::Tensor;

constexpr DLDataType kFloat32{kDLFloat, 32, 1};

inline size_t Bytes(const Tensor& t) { return t.numel() * ((t.dtype().bits + 7) / 8); }
inline int64_t Rows(const Tensor& t) { return t.numel() / t.size(-1); }
inline size_t ElementBytes(DLDataType dtype) { return (dtype.bits + 7) / 8; }

// Which of num_experts local experts (first .. first + num_experts) each (token, slot) uses,
// grouped: rows offsets[e] .. offsets[e + 1] of order are the pairs t * top_k + s of expert e.
struct ExpertGroups {
  std::vector<int32_t> offsets;
  std::vector<int32_t> order;
};

inline ExpertGroups GroupByExpert(const int32_t* experts, int64_t pairs, int64_t first,
                                  int64_t num_experts) {
  ExpertGroups groups{std::vector<int32_t>(num_experts + 1, 0), {}};
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t local = experts[p] - first;
    if (local >= 0 && local < num_experts) ++groups.offsets[local + 1];
  }
  std::partial_sum(groups.offsets.begin(), groups.offsets.end(), groups.offsets.begin());
  groups.order.resize(groups.offsets[num_experts]);
  std::vector<int32_t> cursor(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t local = experts[p] - first;
    if (local >= 0 && local < num_experts) groups.order[cursor[local]++] = static_cast<int32_t>(p);
  }
  return groups;
}

template <typename Device>
class Partitions {
 public:
  using Buffer = typename Device::Buffer;

  // out[rows, n] (float32) = x[rows, k] · weight[n, k]ᵀ
  void Matmul(const Tensor& x, const Tensor& weight, const Tensor& out) {
    Buffer dx = Upload(x), dy = device_.Alloc(Bytes(out));
    device_.Gemm(dx, Rows(x), x.size(-1), x.dtype(), Resident(weight), 0, weight.size(0),
                 weight.dtype(), dy);
    device_.Download(dy, out.data_ptr(), Bytes(out));
  }

  void RmsNorm(const Tensor& x, const Tensor& weight, double eps, const Tensor& out) {
    Buffer dx = Upload(x), dy = device_.Alloc(Bytes(out));
    device_.RmsNorm(dx, Rows(x), x.size(-1), Resident(weight), eps, x.dtype(), dy);
    device_.Download(dy, out.data_ptr(), Bytes(out));
  }

  // out[..., i] = silu(gate_up[..., i]) * gate_up[..., I + i]
  void SwiGlu(const Tensor& gate_up, const Tensor& out) {
    Buffer dx = Upload(gate_up), dy = device_.Alloc(Bytes(out));
    device_.SwiGlu(dx, Rows(gate_up), out.size(-1), gate_up.dtype(), dy);
    device_.Download(dy, out.data_ptr(), Bytes(out));
  }

  // weights, experts [tokens, top_k]: softmax over the experts on the device, then the top_k
  // largest (lowest index first on ties), renormalised to sum to one when asked.
  void MoeRoute(const Tensor& logits, int64_t top_k, bool normalize, const Tensor& weights,
                const Tensor& experts) {
    const int64_t tokens = Rows(logits), num_experts = logits.size(-1);
    Buffer dx = Upload(logits), dp = device_.Alloc(Bytes(logits));
    device_.Softmax(dx, tokens, num_experts, dp);
    std::vector<float> probs(tokens * num_experts);
    device_.Download(dp, probs.data(), probs.size() * sizeof(float));
    auto* w = static_cast<float*>(weights.data_ptr());
    auto* e = static_cast<int32_t*>(experts.data_ptr());
    std::vector<int32_t> index(num_experts);
    for (int64_t t = 0; t < tokens; ++t) {
      const float* row = probs.data() + t * num_experts;
      std::iota(index.begin(), index.end(), 0);
      std::stable_sort(index.begin(), index.end(),
                       [row](int32_t a, int32_t b) { return row[a] > row[b]; });
      float sum = 0;
      for (int64_t s = 0; s < top_k; ++s) sum += row[index[s]];
      for (int64_t s = 0; s < top_k; ++s) {
        w[t * top_k + s] = normalize ? row[index[s]] / sum : row[index[s]];
        e[t * top_k + s] = index[s];
      }
    }
  }

  // out[t] = Σ_s routing[t, s] · down[e] · swiglu(gate_up[e] · x[t]) for e = experts[t, s]
  // among this shard's experts first_expert ..; one GEMM pair per expert over its rows.
  void MoeExperts(const Tensor& experts, const Tensor& first_expert, const Tensor& x,
                  const Tensor& gate_up, const Tensor& down, const Tensor& routing,
                  const Tensor& out) {
    const int64_t tokens = x.size(0), hidden = x.size(1), top_k = experts.size(1);
    const int64_t num_experts = gate_up.size(0), inter = down.size(2);
    const size_t row_bytes = hidden * ElementBytes(x.dtype());
    ExpertGroups groups = GroupByExpert(static_cast<const int32_t*>(experts.data_ptr()),
                                        tokens * top_k,
                                        static_cast<const int64_t*>(first_expert.data_ptr())[0],
                                        num_experts);
    const Buffer& w_gate_up = Resident(gate_up);
    const Buffer& w_down = Resident(down);
    auto* y = static_cast<float*>(out.data_ptr());
    const auto* scale = static_cast<const float*>(routing.data_ptr());
    std::fill(y, y + tokens * hidden, 0.0f);
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t begin = groups.offsets[e], rows = groups.offsets[e + 1] - begin;
      if (rows == 0) continue;
      std::vector<char> gathered(rows * row_bytes);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t token = groups.order[begin + r] / top_k;
        std::memcpy(gathered.data() + r * row_bytes,
                    static_cast<const char*>(x.data_ptr()) + token * row_bytes, row_bytes);
      }
      Buffer dx = device_.Alloc(gathered.size());
      device_.Upload(gathered.data(), gathered.size(), dx);
      Buffer dgu = device_.Alloc(rows * 2 * inter * sizeof(float));
      device_.Gemm(dx, rows, hidden, x.dtype(), w_gate_up, e * 2 * inter * hidden, 2 * inter,
                   gate_up.dtype(), dgu);
      Buffer dact = device_.Alloc(rows * inter * sizeof(float));
      device_.SwiGlu(dgu, rows, inter, kFloat32, dact);
      Buffer dy = device_.Alloc(rows * hidden * sizeof(float));
      device_.Gemm(dact, rows, inter, kFloat32, w_down, e * hidden * inter, hidden,
                   down.dtype(), dy);
      std::vector<float> part(rows * hidden);
      device_.Download(dy, part.data(), part.size() * sizeof(float));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pair = groups.order[begin + r], token = pair / top_k;
        for (int64_t h = 0; h < hidden; ++h) {
          y[token * hidden + h] += scale[pair] * part[r * hidden + h];
        }
      }
    }
  }

 private:
  Buffer Upload(const Tensor& t) {
    Buffer buffer = device_.Alloc(Bytes(t));
    device_.Upload(t.data_ptr(), Bytes(t), buffer);
    return buffer;
  }

  const Buffer& Resident(const Tensor& weight) {
    auto found = resident_.find(weight.data_ptr());
    if (found == resident_.end()) {
      found = resident_.emplace(weight.data_ptr(), Upload(weight)).first;
    }
    return found->second;
  }

  Device device_;
  std::unordered_map<const void*, Buffer> resident_;
};

}  // namespace qwen3c

#endif  // QWEN3C_PARTITIONS_H_
