// A few rows times a bitsandbytes NF4 weight in its plain layout, on AVX512-BF16 CPUs.
//
// Each thread dequantizes a tile of 16 weight rows into a small bf16 buffer once, exactly as
// bitsandbytes' dequantize_4bit does (code[nibble] * absmax in fp32, rounded to nearest
// even: here once per block into a 16-entry table, then looked up), and multiplies every
// input row by the tile with dpbf16 dot products. bitsandbytes' fused kernel instead decodes
// the whole weight again for each input row, and dequantize-then-mm writes and reads the
// whole bf16 weight; this reads the 4-bit weight once per call.
//
// Plain layout: the weight [N, K] row-major as nibbles, element e in byte e / 2 (the high
// nibble for even e), one fp32 absmax per `blocksize` consecutive elements. A dot product
// only needs the input and the weight in the same order, so both are laid out per 64-column
// block in the order that unpacking nibbles into bf16 pairs gives (`block_order`).

#include <immintrin.h>
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTile = 16;   // weight rows dequantized together
constexpr int64_t kBlock = 64;  // columns per dequantization step: 32 bytes of nibbles
constexpr int kRows = 4;        // input rows and weight rows per register block

// Where each of a 64-column block's columns lands: the dequantized block is two registers of
// (even, odd) bf16 pairs from unpacklo/unpackhi, which pair within 128-bit lanes.
std::array<int, kBlock> block_order() {
    std::array<int, kBlock> order{};
    for (int half = 0; half < 2; ++half) {  // unpacklo, unpackhi
        for (int word = 0; word < 32; ++word) {
            const int dword = word / 2, lane = dword / 4;
            const int pair = 8 * lane + 4 * half + dword % 4;
            order[32 * half + word] = 2 * pair + word % 2;
        }
    }
    return order;
}

uint16_t to_bf16(float value) {  // round to nearest even, as the vector conversions do
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) {
        return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

// The input rows (bf16) with each 64-column block in block_order.
std::vector<uint16_t> ordered_rows(const uint16_t* x, int64_t rows, int64_t k) {
    const auto order = block_order();
    std::vector<uint16_t> out(rows * k);
    for (int64_t m = 0; m < rows; ++m) {
        for (int64_t c = 0; c < k; c += kBlock) {
            for (int64_t i = 0; i < kBlock; ++i) out[m * k + c + i] = x[m * k + c + order[i]];
        }
    }
    return out;
}

// One weight row's k columns from flat element `first`, into `out` in block_order.
void dequantize_row(const uint8_t* packed, const float* absmax, __m512 code, int64_t first,
                    int64_t k, int64_t blocksize, uint16_t* out) {
    const __m512i nibble = _mm512_set1_epi16(15);
    for (int64_t c = 0; c < k; c += kBlock) {
        const int64_t element = first + c;
        const __m512 scaled = _mm512_mul_ps(code, _mm512_set1_ps(absmax[element / blocksize]));
        const __m256bh rounded = _mm512_cvtneps_pbh(scaled);  // RNE, as bitsandbytes
        const __m512i table = _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(rounded));
        const __m512i bytes = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + element / 2)));
        const __m512i even = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
        const __m512i odd = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, nibble), table);
        _mm512_storeu_si512(out + c, _mm512_unpacklo_epi16(even, odd));
        _mm512_storeu_si512(out + c + 32, _mm512_unpackhi_epi16(even, odd));
    }
}

inline __m512 dot_step(__m512 acc, const uint16_t* a, const uint16_t* b) {
    const __m512i va = _mm512_loadu_si512(a), vb = _mm512_loadu_si512(b);
    return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(va),
                            reinterpret_cast<const __m512bh&>(vb));
}

// Sums each of 16 registers at once: lane j of the result is the sum of the lanes of
// acc[kSumOf[j]] (adds pair halves of two registers per instruction, as a transposition).
__m512 sum16(__m512 (&acc)[16]) {
    __m512 t[8], u[4], v[2];
    for (int i = 0; i < 8; ++i) {
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[i], acc[i + 8], 0x44),
                             _mm512_shuffle_f32x4(acc[i], acc[i + 8], 0xee));
    }
    for (int i = 0; i < 4; ++i) {
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], 0x88),
                             _mm512_shuffle_f32x4(t[i], t[i + 4], 0xdd));
    }
    for (int i = 0; i < 2; ++i) {
        v[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], 0x44),
                             _mm512_shuffle_ps(u[i], u[i + 2], 0xee));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xdd));
}

// Which register's sum each lane of sum16 holds, found by running it once.
std::array<int, 16> sum16_order() {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum16(acc));
    std::array<int, 16> order{};
    for (int j = 0; j < 16; ++j) order[j] = static_cast<int>(sums[j] / 16.0f);
    return order;
}
const std::array<int, 16> kSumOf = sum16_order();

// Outputs [M0 .. M0 + R) x [tile rows N0 .. N0 + C): R * C dot products over k, sharing
// loads; out[r][c] (kRows x kRows, the rest left at 0).
template <int R, int C>
void multiply_block(const uint16_t* x, const uint16_t* tile, int64_t k, float (&out)[kRows][kRows]) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t col = 0; col < k; col += 32) {
        __m512i w[C];
        for (int c = 0; c < C; ++c) w[c] = _mm512_loadu_si512(tile + c * k + col);
        for (int r = 0; r < R; ++r) {
            const __m512i xv = _mm512_loadu_si512(x + r * k + col);
            for (int c = 0; c < C; ++c) {
                acc[r * kRows + c] = _mm512_dpbf16_ps(acc[r * kRows + c],
                                                      reinterpret_cast<const __m512bh&>(xv),
                                                      reinterpret_cast<const __m512bh&>(w[c]));
            }
        }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum16(acc));
    for (int j = 0; j < 16; ++j) out[kSumOf[j] / kRows][kSumOf[j] % kRows] = sums[j];
}

template <int R>
void multiply_rows(const uint16_t* x, const uint16_t* tile, int64_t k, int columns,
                   float (&out)[kRows][kRows]) {
    switch (columns) {
        case 1: return multiply_block<R, 1>(x, tile, k, out);
        case 2: return multiply_block<R, 2>(x, tile, k, out);
        case 3: return multiply_block<R, 3>(x, tile, k, out);
        default: return multiply_block<R, kRows>(x, tile, k, out);
    }
}

void multiply(const uint16_t* x, int rows, const uint16_t* tile, int64_t k, int columns,
              float (&out)[kRows][kRows]) {
    switch (rows) {
        case 1: return multiply_rows<1>(x, tile, k, columns, out);
        case 2: return multiply_rows<2>(x, tile, k, columns, out);
        case 3: return multiply_rows<3>(x, tile, k, columns, out);
        default: return multiply_rows<kRows>(x, tile, k, columns, out);
    }
}

}  // namespace

// x [M, K] bf16, packed uint8 (N * K / 2 bytes), absmax fp32 [N * K / blocksize], code fp32
// [16] -> x times the weight transposed, [M, N] bf16.
torch::Tensor nf4_gemm(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax,
                       torch::Tensor code, int64_t n, int64_t blocksize) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(),
                "x must be a contiguous bf16 matrix");
    TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed: uint8");
    TORCH_CHECK(absmax.scalar_type() == torch::kFloat32 && absmax.is_contiguous(), "absmax: fp32");
    TORCH_CHECK(code.scalar_type() == torch::kFloat32 && code.numel() == 16, "code: 16 fp32");
    const int64_t rows = x.size(0), k = x.size(1);
    TORCH_CHECK(k % kBlock == 0 && blocksize % kBlock == 0, "K and blocksize: multiples of 64");
    TORCH_CHECK(packed.numel() * 2 == n * k && absmax.numel() * blocksize == n * k,
                "weight and scales do not match [N, K]");
    const auto* raw = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const std::vector<uint16_t> inputs = ordered_rows(raw, rows, k);
    auto out = torch::empty({rows, n}, x.options());
    auto* result = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const auto* weight = packed.data_ptr<uint8_t>();
    const float* scales = absmax.data_ptr<float>();
    const __m512 table = _mm512_loadu_ps(code.data_ptr<float>());
    const int64_t tiles = (n + kTile - 1) / kTile;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        std::vector<uint16_t> buffer(kTile * k);
        float block[kRows][kRows];
        for (int64_t t = begin; t < end; ++t) {
            const int64_t first = t * kTile, count = std::min(kTile, n - first);
            for (int64_t r = 0; r < count; ++r) {
                dequantize_row(weight, scales, table, (first + r) * k, k, blocksize,
                               buffer.data() + r * k);
            }
            for (int64_t m = 0; m < rows; m += kRows) {
                const int r_count = static_cast<int>(std::min<int64_t>(kRows, rows - m));
                for (int64_t c = 0; c < count; c += kRows) {
                    const int c_count = static_cast<int>(std::min<int64_t>(kRows, count - c));
                    multiply(inputs.data() + m * k, r_count, buffer.data() + c * k, k, c_count,
                             block);
                    for (int i = 0; i < r_count; ++i)
                        for (int j = 0; j < c_count; ++j)
                            result[(m + i) * n + first + c + j] = to_bf16(block[i][j]);
                }
            }
        }
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("nf4_gemm", &nf4_gemm, "x [M, K] times a plain-layout NF4 weight [N, K], transposed");
}
