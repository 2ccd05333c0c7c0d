// Ids of the relation losses and MI bounds as the kernels receive them. The Python table is
// kernels/ids.py; bindings.cpp exports these as pykd._C.RELATION_LOSS_IDS and pykd._C.MI_BOUND_IDS
// and tests/test_ids.py checks that Python, C++ and the Triton kernels agree name by name.
#pragma once

#include <array>
#include <cstdint>
#include <utility>

namespace pykd {

enum class RelationLoss : int64_t { kKL = 0, kCE = 1, kMseProb = 2, kMseLogit = 3 };

inline constexpr std::array<std::pair<const char*, RelationLoss>, 4> kRelationLossNames{{
    {"kl", RelationLoss::kKL},
    {"ce", RelationLoss::kCE},
    {"mse_prob", RelationLoss::kMseProb},
    {"mse_logit", RelationLoss::kMseLogit},
}};

enum class Bound : int64_t { kInfoNCE = 0, kNWJ = 1, kTUBA = 2, kJS = 3, kAlpha = 4 };

inline constexpr std::array<std::pair<const char*, Bound>, 5> kBoundNames{{
    {"infonce", Bound::kInfoNCE},
    {"nwj", Bound::kNWJ},
    {"tuba", Bound::kTUBA},
    {"js", Bound::kJS},
    {"alpha", Bound::kAlpha},
}};

// An id the kernels know: one of the table's values (ids need not be 0..N-1 in table order).
template <typename Enum, size_t N>
bool known_id(const std::array<std::pair<const char*, Enum>, N>& table, int64_t id) {
  for (const auto& entry : table)
    if (static_cast<int64_t>(entry.second) == id) return true;
  return false;
}

}  // namespace pykd
