// Exported communicator functions: argument checks, then the core.
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "api/guard.h"
#include "core/bootstrap.h"
#include "core/comm_init.h"
#include "core/env.h"
#include "core/log.h"
#include "ep/ep.h"

using moecomm::checkCommAlive;
using moecomm::checkCommUsable;
using moecomm::guarded;
using moecomm::setError;

namespace {

moecommResult_t initRank(moecommComm_t* comm, int nranks, const moecommUniqueId& id, int rank,
                         const moecommConfig_t* config) {
  MC_REQUIRE(comm != nullptr, moecommInvalidArgument, "comm (the output pointer) is NULL");
  *comm = nullptr;
  MC_REQUIRE(nranks >= 1 && nranks <= 65536, moecommInvalidArgument, "nranks is %d; it must be in 1..65536", nranks);
  MC_REQUIRE(rank >= 0 && rank < nranks, moecommInvalidArgument, "rank is %d; it must be in 0..%d", rank, nranks - 1);
  moecomm::ResolvedConfig resolved;
  MC_CHECK(moecomm::resolveConfig(config, &resolved));
  std::unique_ptr<moecomm::Bootstrap> bootstrap;
  MC_CHECK(moecomm::bootstrapCreateTcp(id, rank, nranks, resolved.timeoutMs, &bootstrap));
  return moecomm::commCreate(std::move(bootstrap), resolved, comm);
}

// Parses a whole decimal integer environment value.
bool parseEnvInt(const char* name, int* out) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return false;
  char* end = nullptr;
  long value = std::strtol(text, &end, 10);
  if (*end != '\0' || value < -1 || value > 1 << 20) return false;
  *out = static_cast<int>(value);
  return true;
}

// The shared shape of the read-only queries: a live comm (aborted or not) and a non-NULL
// output, which receives read(comm).
template <class T, class Read>
moecommResult_t queryComm(const char* function, moecommComm_t comm, T* out, const char* outName, Read read) {
  return guarded(function, [&] {
    MC_CHECK(checkCommAlive(comm));
    MC_REQUIRE(out != nullptr, moecommInvalidArgument, "%s is NULL", outName);
    *out = read(*comm);
    return moecommSuccess;
  });
}

}  // namespace

extern "C" {

MOECOMM_API moecommResult_t moecommGetUniqueId(moecommUniqueId* uniqueId) {
  return guarded(__func__, [&] {
    MC_REQUIRE(uniqueId != nullptr, moecommInvalidArgument, "uniqueId is NULL");
    return moecomm::bootstrapCreateUniqueId(uniqueId);
  });
}

MOECOMM_API moecommResult_t moecommUniqueIdToString(const moecommUniqueId* uniqueId, char* buffer, size_t bufferBytes) {
  return guarded(__func__, [&] {
    MC_REQUIRE(uniqueId != nullptr, moecommInvalidArgument, "uniqueId is NULL");
    MC_REQUIRE(buffer != nullptr, moecommInvalidArgument, "buffer is NULL");
    MC_REQUIRE(bufferBytes >= MOECOMM_UNIQUE_ID_STRING_BYTES, moecommInvalidArgument,
               "bufferBytes is %zu; it must be at least MOECOMM_UNIQUE_ID_STRING_BYTES (%d)", bufferBytes,
               MOECOMM_UNIQUE_ID_STRING_BYTES);
    static const char kHex[] = "0123456789abcdef";
    for (int i = 0; i < MOECOMM_UNIQUE_ID_BYTES; ++i) {
      unsigned char byte = static_cast<unsigned char>(uniqueId->internal[i]);
      buffer[2 * i] = kHex[byte >> 4];
      buffer[2 * i + 1] = kHex[byte & 15];
    }
    buffer[2 * MOECOMM_UNIQUE_ID_BYTES] = '\0';
    return moecommSuccess;
  });
}

MOECOMM_API moecommResult_t moecommUniqueIdFromString(const char* text, moecommUniqueId* uniqueId) {
  return guarded(__func__, [&] {
    MC_REQUIRE(text != nullptr, moecommInvalidArgument, "text is NULL");
    MC_REQUIRE(uniqueId != nullptr, moecommInvalidArgument, "uniqueId is NULL");
    const size_t length = std::strlen(text);
    MC_REQUIRE(length == 2 * MOECOMM_UNIQUE_ID_BYTES, moecommInvalidArgument,
               "the id text has %zu characters; a unique id is %d hex characters", length, 2 * MOECOMM_UNIQUE_ID_BYTES);
    moecommUniqueId parsed;
    for (int i = 0; i < 2 * MOECOMM_UNIQUE_ID_BYTES; ++i) {
      char c = text[i];
      int nibble = (c >= '0' && c <= '9')   ? c - '0'
                   : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                   : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                            : -1;
      MC_REQUIRE(nibble >= 0, moecommInvalidArgument, "the id text has a non-hex character '%c' at position %d", c, i);
      if (i % 2 == 0) {
        parsed.internal[i / 2] = static_cast<char>(nibble << 4);
      } else {
        parsed.internal[i / 2] = static_cast<char>(parsed.internal[i / 2] | nibble);
      }
    }
    *uniqueId = parsed;
    return moecommSuccess;
  });
}

MOECOMM_API moecommResult_t moecommCommInitRank(moecommComm_t* comm, int nranks, moecommUniqueId id, int rank,
                                                const moecommConfig_t* config) {
  return guarded(__func__, [&] { return initRank(comm, nranks, id, rank, config); });
}

MOECOMM_API moecommResult_t moecommCommInitFromEnv(moecommComm_t* comm, const moecommConfig_t* config) {
  return guarded(__func__, [&] {
    MC_REQUIRE(comm != nullptr, moecommInvalidArgument, "comm (the output pointer) is NULL");
    *comm = nullptr;
    int rank = -1;
    int nranks = 0;
    MC_REQUIRE(parseEnvInt("MOECOMM_RANK", &rank), moecommInvalidUsage,
               "MOECOMM_RANK is not set to an integer (start the program with moecomm-run)");
    MC_REQUIRE(parseEnvInt("MOECOMM_NRANKS", &nranks), moecommInvalidUsage,
               "MOECOMM_NRANKS is not set to an integer (start the program with moecomm-run)");
    const char* idText = std::getenv("MOECOMM_UNIQUE_ID");
    MC_REQUIRE(idText != nullptr, moecommInvalidUsage,
               "MOECOMM_UNIQUE_ID is not set (start the program with moecomm-run)");
    moecommUniqueId id;
    if (moecommUniqueIdFromString(idText, &id) != moecommSuccess) {
      return setError(moecommInvalidUsage, "MOECOMM_UNIQUE_ID is malformed: %s", moecomm::lastErrorText());
    }
    return initRank(comm, nranks, id, rank, config);
  });
}

MOECOMM_API moecommResult_t moecommCommInitAll(moecommComm_t* comms, int n, const int* devices) {
  return guarded(__func__, [&]() -> moecommResult_t {
    MC_REQUIRE(comms != nullptr, moecommInvalidArgument, "comms is NULL");
    MC_REQUIRE(n >= 1 && n <= 4096, moecommInvalidArgument, "n is %d; it must be in 1..4096", n);
    for (int i = 0; i < n; ++i) comms[i] = nullptr;
    if (devices != nullptr) {
      for (int i = 0; i < n; ++i) {
        MC_REQUIRE(devices[i] >= 0, moecommInvalidArgument, "devices[%d] is %d; device ordinals are >= 0", i,
                   devices[i]);
      }
    }
    moecomm::ResolvedConfig resolved;
    MC_CHECK(moecomm::resolveConfig(nullptr, &resolved));
    std::vector<std::unique_ptr<moecomm::Bootstrap>> bootstraps;
    MC_CHECK(moecomm::bootstrapCreateInProcess(n, resolved.timeoutMs, &bootstraps));
    std::vector<moecommResult_t> results(n, moecommSuccess);
    std::vector<std::string> errors(n);
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] {
        moecomm::ResolvedConfig mine = resolved;
        mine.device = devices ? devices[i] : (resolved.backend == moecommBackendHost ? -1 : i);
        // Without a GPU, Auto picks the host backend and the device is ignored.
        results[i] = guarded("moecommCommInitAll",
                             [&] { return moecomm::commCreate(std::move(bootstraps[i]), mine, &comms[i]); });
        errors[i] = moecomm::lastErrorText();
      });
    }
    for (auto& thread : threads) thread.join();
    for (int i = 0; i < n; ++i) {
      if (results[i] == moecommSuccess) continue;
      for (int j = 0; j < n; ++j) {
        if (comms[j] != nullptr) {
          moecomm::commAbort(comms[j]);
          moecomm::commDestroy(comms[j]);
          comms[j] = nullptr;
        }
      }
      return setError(results[i], "rank %d: %s", i, errors[i].c_str());
    }
    return moecommSuccess;
  });
}

MOECOMM_API moecommResult_t moecommCommInitExternal(moecommComm_t* comm, int nranks, int rank,
                                                    const moecommExternalBootstrap_t* bootstrap,
                                                    const moecommConfig_t* config) {
  return guarded(__func__, [&] {
    MC_REQUIRE(comm != nullptr, moecommInvalidArgument, "comm (the output pointer) is NULL");
    *comm = nullptr;
    MC_CHECK(moecomm::checkStructHeader(bootstrap, MOECOMM_EXTERNAL_BOOTSTRAP_MAGIC, "bootstrap",
                                        "MOECOMM_EXTERNAL_BOOTSTRAP_INIT"));
    MC_REQUIRE(bootstrap->allgather != nullptr, moecommInvalidArgument, "bootstrap->allgather is NULL");
    MC_REQUIRE(bootstrap->barrier != nullptr, moecommInvalidArgument, "bootstrap->barrier is NULL");
    MC_REQUIRE(nranks >= 1 && nranks <= 65536, moecommInvalidArgument, "nranks is %d; it must be in 1..65536", nranks);
    MC_REQUIRE(rank >= 0 && rank < nranks, moecommInvalidArgument, "rank is %d; it must be in 0..%d", rank, nranks - 1);
    moecomm::ResolvedConfig resolved;
    MC_CHECK(moecomm::resolveConfig(config, &resolved));
    std::unique_ptr<moecomm::Bootstrap> external;
    MC_CHECK(moecomm::bootstrapCreateExternal(*bootstrap, rank, nranks, &external));
    return moecomm::commCreate(std::move(external), resolved, comm);
  });
}

MOECOMM_API moecommResult_t moecommCommDestroy(moecommComm_t comm) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommAlive(comm));
    return moecomm::commDestroy(comm);
  });
}

MOECOMM_API moecommResult_t moecommCommAbort(moecommComm_t comm) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommAlive(comm));
    moecomm::commAbort(comm);
    return moecommSuccess;
  });
}

MOECOMM_API moecommResult_t moecommCommGetAsyncError(moecommComm_t comm, moecommResult_t* asyncError) {
  return queryComm(__func__, comm, asyncError, "asyncError", [](moecommComm& c) {
    // Errors the EPs' kernels recorded since their last call count now, not at the next call.
    {
      std::lock_guard<std::mutex> lock(c.mutex);
      for (moecommEp* ep : c.eps) {
        if (ep->backend != nullptr) ep->backend->pollAsyncErrors();
      }
    }
    return static_cast<moecommResult_t>(c.asyncError.load());
  });
}

MOECOMM_API moecommResult_t moecommCommCount(moecommComm_t comm, int* count) {
  return queryComm(__func__, comm, count, "count", [](const moecommComm& c) { return c.nranks; });
}

MOECOMM_API moecommResult_t moecommCommUserRank(moecommComm_t comm, int* rank) {
  return queryComm(__func__, comm, rank, "rank", [](const moecommComm& c) { return c.rank; });
}

MOECOMM_API moecommResult_t moecommCommDevice(moecommComm_t comm, int* device) {
  return queryComm(__func__, comm, device, "device", [](const moecommComm& c) { return c.device; });
}

MOECOMM_API moecommResult_t moecommCommBackend(moecommComm_t comm, moecommBackend_t* backend) {
  return queryComm(__func__, comm, backend, "backend", [](const moecommComm& c) { return c.backend; });
}

MOECOMM_API moecommResult_t moecommCommGetTopology(moecommComm_t comm, const char** json) {
  return queryComm(__func__, comm, json, "json", [](const moecommComm& c) { return c.topologyJson.c_str(); });
}

}  // extern "C"
