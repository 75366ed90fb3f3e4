// A few rows times a bitsandbytes NF4 weight in its plain layout, on AVX512-BF16 CPUs.
//
// Each thread takes a tile of 16 weight rows and, one 64-column block at a time, dequantizes
// it in registers exactly as bitsandbytes' dequantize_4bit does (code[nibble] * absmax in
// fp32, rounded to nearest even: here once per block into a 16-entry table, then looked up),
// transposes it so that one register holds one pair of columns of all 16 rows (the layout
// dpbf16 wants, outputs in lanes), and keeps the tile's pairs in a small buffer. Then each
// input row's column pair is broadcast against a pair register, so a row accumulates its 16
// outputs in registers, with no horizontal sums. bitsandbytes' fused kernel instead decodes
// the whole weight again for each input row, and dequantize-then-mm writes and reads the whole
// bf16 weight; this reads the 4-bit weight once per call.
//
// A row's sums run in the same order whatever the batch holds (kChains accumulators per row,
// by column pair modulo kChains, added in a fixed order), so its outputs do not depend on its
// batch.
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
#include <vector>

namespace {

constexpr int64_t kTile = 16;   // weight rows dequantized together
constexpr int64_t kBlock = 64;  // columns per dequantization step: 32 bytes of nibbles
constexpr int kChains = 4;  // accumulators per input row
constexpr int kRows = 16 / kChains;  // input rows per register block: 16 accumulators

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

// One 64-column block of a weight row, from flat element `element`: its 32 column pairs in
// block_order, in two registers of 16.
inline void dequantize_block(const uint8_t* packed, const float* absmax, __m512 code,
                             int64_t element, int64_t blocksize, __m512i& low, __m512i& high) {
    const __m512 scaled = _mm512_mul_ps(code, _mm512_set1_ps(absmax[element / blocksize]));
    const __m256bh rounded = _mm512_cvtneps_pbh(scaled);  // RNE, as bitsandbytes
    const __m512i table = _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(rounded));
    const __m512i bytes = _mm512_cvtepu8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + element / 2)));
    const __m512i even = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
    const __m512i odd =
        _mm512_permutexvar_epi16(_mm512_and_si512(bytes, _mm512_set1_epi16(15)), table);
    low = _mm512_unpacklo_epi16(even, odd);
    high = _mm512_unpackhi_epi16(even, odd);
}

// Transposes 16 registers of 16 dwords in place, up to the order of the registers: register
// o then holds, lane j, dword column_of[o] of input register j (transpose16_columns).
void transpose16(__m512i (&r)[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8) {
        for (int i = 0; i < 4; ++i) {
            t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

// Which input dword each register of transpose16 holds, found by running it once (and
// checked: lane j must hold input register j, or outputs would land in the wrong columns).
std::array<int, 16> transpose16_columns() {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
        alignas(64) int32_t v[16];
        for (int j = 0; j < 16; ++j) v[j] = 16 * i + j;
        r[i] = _mm512_load_si512(v);
    }
    transpose16(r);
    std::array<int, 16> column{};
    for (int o = 0; o < 16; ++o) {
        alignas(64) int32_t v[16];
        _mm512_store_si512(v, r[o]);
        column[o] = v[0] % 16;
        for (int j = 0; j < 16; ++j) TORCH_CHECK(v[j] == 16 * j + column[o], "transpose16");
    }
    return column;
}

// Weight rows [first, first + count) as [k / 2][kTile] column pairs (rows past count: 0).
void dequantize_tile(const uint8_t* packed, const float* absmax, __m512 code, int64_t first,
                     int64_t count, int64_t k, int64_t blocksize, uint32_t* pairs) {
    static const std::array<int, 16> column_of = transpose16_columns();
    for (int64_t c = 0; c < k; c += kBlock) {
        __m512i low[16], high[16];  // column pairs 0-15 and 16-31 of each row
        for (int r = 0; r < kTile; ++r) {
            if (r < count) {
                dequantize_block(packed, absmax, code, (first + r) * k + c, blocksize, low[r],
                                 high[r]);
            } else {
                low[r] = high[r] = _mm512_setzero_si512();
            }
        }
        transpose16(low);
        transpose16(high);
        for (int o = 0; o < 16; ++o) {
            _mm512_storeu_si512(pairs + (c / 2 + column_of[o]) * kTile, low[o]);
            _mm512_storeu_si512(pairs + (c / 2 + 16 + column_of[o]) * kTile, high[o]);
        }
    }
}

// R input rows (column pairs as dwords, k / 2 a row) times the tile's pairs: the 16 outputs
// of each row, rounded to bf16, into out[r * n ..] (the first `count` of them). Each row sums
// column pair p into accumulator p % kChains (latency-bound chains otherwise), then the
// accumulators in a fixed order.
template <int R>
void multiply_rows(const uint32_t* x, const uint32_t* pairs, int64_t k, uint16_t* out,
                   int64_t n, int count) {
    __m512 acc[R][kChains];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kChains; ++c) acc[r][c] = _mm512_setzero_ps();
    const int64_t half = k / 2;
    for (int64_t p = 0; p < half; p += kChains) {
        for (int c = 0; c < kChains; ++c) {
            const __m512i w = _mm512_loadu_si512(pairs + (p + c) * kTile);
            for (int r = 0; r < R; ++r) {
                const __m512i xr = _mm512_set1_epi32(static_cast<int>(x[r * half + p + c]));
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], reinterpret_cast<const __m512bh&>(xr),
                                             reinterpret_cast<const __m512bh&>(w));
            }
        }
    }
    const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1u);
    for (int r = 0; r < R; ++r) {
        __m512 sum = acc[r][0];
        for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[r][c]);
        const __m256bh rounded = _mm512_cvtneps_pbh(sum);  // RNE
        _mm256_mask_storeu_epi16(out + r * n, lanes, reinterpret_cast<const __m256i&>(rounded));
    }
}

void multiply(const uint32_t* x, int rows, const uint32_t* pairs, int64_t k, uint16_t* out,
              int64_t n, int count) {
    switch (rows) {  // kRows at most
        case 1: return multiply_rows<1>(x, pairs, k, out, n, count);
        case 2: return multiply_rows<2>(x, pairs, k, out, n, count);
        case 3: return multiply_rows<3>(x, pairs, k, out, n, count);
        default: return multiply_rows<kRows>(x, pairs, k, out, n, count);
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
    const auto* input_pairs = reinterpret_cast<const uint32_t*>(inputs.data());
    auto out = torch::empty({rows, n}, x.options());
    auto* result = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const auto* weight = packed.data_ptr<uint8_t>();
    const float* scales = absmax.data_ptr<float>();
    const __m512 table = _mm512_loadu_ps(code.data_ptr<float>());
    const int64_t tiles = (n + kTile - 1) / kTile;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        std::vector<uint32_t> pairs(kTile * k / 2);
        for (int64_t t = begin; t < end; ++t) {
            const int64_t first = t * kTile, count = std::min(kTile, n - first);
            dequantize_tile(weight, scales, table, first, count, k, blocksize, pairs.data());
            for (int64_t m = 0; m < rows; m += kRows) {
                const int r_count = static_cast<int>(std::min<int64_t>(kRows, rows - m));
                multiply(input_pairs + m * k / 2, r_count, pairs.data(), k, result + m * n + first,
                         n, static_cast<int>(count));
            }
        }
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("nf4_gemm", &nf4_gemm, "x [M, K] times a plain-layout NF4 weight [N, K], transposed");
}
