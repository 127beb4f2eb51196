// The CUDA half of the NVLink transport: NvlinkSymmetric's collective creation, its three
// sharing methods and the RAII owners of every allocation, mapping and descriptor.
//
// Creation runs in three agreed steps, each ending in an allgather that carries every rank's
// status, so a failure anywhere fails every rank at the same step instead of leaving peers
// waiting (and the ranks stay in step for the next collective):
//   1. describe: process, network namespace, GPU bus id, cuMem support, requested method;
//   2. allocate: choose the method (the same pure function on every rank), check peer access
//      for every pair, allocate and zero the local buffer, export it;
//   3. attach: exchange addresses / IPC handles (allgather) or file descriptors (unix
//      sockets), map every peer's buffer.
// When step 3 fails after some ranks mapped peers, every rank detaches, passes a barrier and
// only then frees its own buffer (legacy IPC forbids freeing memory a peer still has open).
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>

#include "core/align.h"
#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "transport/nvlink.h"

#if MOECOMM_HAVE_CUDA
#include "transport/cuda_driver.h"
#include "transport/fd_passing.h"
#endif

namespace moecomm {

// Owns one mapping of device memory; the subclasses know how to give it back.
class NvlinkRegion {
 public:
  virtual ~NvlinkRegion() = default;
  void* address = nullptr;
};

NvlinkSymmetric::NvlinkSymmetric() = default;

#if !MOECOMM_HAVE_CUDA

NvlinkSymmetric::~NvlinkSymmetric() = default;
moecommResult_t NvlinkSymmetric::detachPeers() { return moecommSuccess; }

moecommResult_t NvlinkSymmetric::create(moecommComm* comm, size_t bytes, std::unique_ptr<NvlinkSymmetric>* out) {
  return setError(moecommNotSupported, "symmetric GPU memory needs CUDA, and libmoecomm was built without it");
}

bool nvlinkCuMemSupported(int device, std::string* why) {
  if (why) *why = "libmoecomm was built without CUDA";
  return false;
}

#else  // MOECOMM_HAVE_CUDA

namespace {

constexpr size_t kReasonBytes = 240;
// Legacy IPC allocations are rounded to whole 2 MiB pages, so an exported page never holds
// another allocation's bytes.
constexpr size_t kIpcGranularity = size_t{2} << 20;
constexpr size_t kDirectGranularity = 256;
constexpr uint64_t kFdMessageMagic = 0x6d634e766c466431ull;  // "mcNvlFd1"

void copyText(char* destination, size_t capacity, const std::string& text) {
  std::snprintf(destination, capacity, "%s", text.c_str());
}

// Restores the calling thread's current device when it goes out of scope.
class DeviceGuard {
 public:
  DeviceGuard() {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      previous_ = -1;
      (void)cudaGetLastError();
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// ---- Owners --------------------------------------------------------------------------

class CudaMallocRegion : public NvlinkRegion {
 public:
  ~CudaMallocRegion() override {
    if (address == nullptr) return;
    cudaError_t error = cudaFree(address);
    if (error != cudaSuccess) {
      MC_WARN(kLogMem, "cudaFree(%p) failed: %s", address, cudaGetErrorName(error));
      (void)cudaGetLastError();
    }
  }
};

class IpcRegion : public NvlinkRegion {
 public:
  ~IpcRegion() override {
    if (address == nullptr) return;
    cudaError_t error = cudaIpcCloseMemHandle(address);
    if (error != cudaSuccess) {
      MC_WARN(kLogMem, "cudaIpcCloseMemHandle(%p) failed: %s", address, cudaGetErrorName(error));
      (void)cudaGetLastError();
    }
  }
};

// A cuMem allocation handle (created here or imported) mapped at a reserved address range.
class VmmRegion : public NvlinkRegion {
 public:
  VmmRegion(const CudaDriver* driver, size_t size) : driver_(driver), size_(size) {}
  ~VmmRegion() override {
    if (mapped_) warnOnError(driver_->memUnmap(base_, size_), "cuMemUnmap");
    if (base_ != 0) warnOnError(driver_->memAddressFree(base_, size_), "cuMemAddressFree");
    if (haveHandle_) warnOnError(driver_->memRelease(handle_), "cuMemRelease");
  }

  moecommResult_t create(CUdevice device, bool gpuDirectRdma) {
    CUmemAllocationProp prop = allocationProp(device);
    if (gpuDirectRdma) prop.allocFlags.gpuDirectRDMACapable = 1;
    MC_CHECK(check(driver_->memCreate(&handle_, size_, &prop, 0), "cuMemCreate"));
    haveHandle_ = true;
    return moecommSuccess;
  }

  // Takes a reference on the allocation behind fd; the caller still owns (and closes) fd.
  moecommResult_t import(int fd) {
    // The POSIX-fd handle type takes the descriptor itself in the pointer, not its address.
    void* osHandle = reinterpret_cast<void*>(static_cast<uintptr_t>(fd));  // NOLINT(performance-no-int-to-ptr)
    MC_CHECK(check(driver_->memImportFromShareableHandle(&handle_, osHandle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                   "cuMemImportFromShareableHandle"));
    haveHandle_ = true;
    return moecommSuccess;
  }

  // Reserves an address range, maps the allocation there and grants `device` read/write.
  moecommResult_t map(size_t alignment, CUdevice device) {
    CUdeviceptr base = 0;
    MC_CHECK(check(driver_->memAddressReserve(&base, size_, alignment, 0, 0), "cuMemAddressReserve"));
    base_ = base;
    MC_CHECK(check(driver_->memMap(base_, size_, 0, handle_, 0), "cuMemMap"));
    mapped_ = true;
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    MC_CHECK(check(driver_->memSetAccess(base_, size_, &access, 1), "cuMemSetAccess"));
    address = reinterpret_cast<void*>(base_);  // NOLINT(performance-no-int-to-ptr): a device address
    return moecommSuccess;
  }

  moecommResult_t exportFd(UniqueFd* out) {
    int fd = -1;
    MC_CHECK(check(driver_->memExportToShareableHandle(&fd, handle_, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                   "cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR)"));
    out->reset(fd);
    return moecommSuccess;
  }

  static CUmemAllocationProp allocationProp(CUdevice device) {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    return prop;
  }

 private:
  moecommResult_t check(CUresult result, const char* call) {
    if (result == CUDA_SUCCESS) return moecommSuccess;
    return setError(moecommUnhandledCudaError, "%s (%zu bytes) failed: %s", call, size_, cudaDriverErrorName(result));
  }
  static void warnOnError(CUresult result, const char* call) {
    if (result != CUDA_SUCCESS) MC_WARN(kLogMem, "%s failed: %s", call, cudaDriverErrorName(result));
  }

  const CudaDriver* driver_;
  size_t size_;
  CUmemGenericAllocationHandle handle_ = 0;
  bool haveHandle_ = false;
  CUdeviceptr base_ = 0;
  bool mapped_ = false;
};

// Zero-fills on a private non-blocking stream, so a kernel the application left running on
// a blocking stream (a persistent communication kernel, say) cannot stall the allocation.
moecommResult_t zeroFill(void* address, size_t bytes) {
  cudaStream_t stream = nullptr;
  MC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaError_t error = cudaMemsetAsync(address, 0, bytes, stream);
  if (error == cudaSuccess) error = cudaStreamSynchronize(stream);
  const cudaError_t destroyed = cudaStreamDestroy(stream);
  if (error != cudaSuccess) return cudaRuntimeError(error, "zero-filling the buffer (cudaMemsetAsync + sync)");
  if (destroyed != cudaSuccess) return cudaRuntimeError(destroyed, "cudaStreamDestroy");
  return moecommSuccess;
}

// ---- Rank description (step 1) ---------------------------------------------------------

// Differs between processes even when pids repeat (pid namespaces, pid reuse).
uint64_t processNonce() {
  static const uint64_t nonce = [] {
    std::random_device entropy;
    return (static_cast<uint64_t>(entropy()) << 32) ^ entropy();
  }();
  return nonce;
}

uint64_t mix(uint64_t hash, uint64_t value) {
  hash ^= value + 0x9e3779b97f4a7c15ull + (hash << 6) + (hash >> 2);
  return hash;
}

uint64_t networkNamespaceId() {
  struct stat info;
  if (stat("/proc/self/ns/net", &info) != 0) return 0;
  return mix(mix(1, static_cast<uint64_t>(info.st_dev)), static_cast<uint64_t>(info.st_ino)) | 1;
}

struct StatusRecord {
  int32_t code;
  char reason[kReasonBytes];
};

struct RankInfo {
  uint64_t processId;
  uint64_t netNamespace;
  uint64_t secret;       // authenticates this rank's file-descriptor messages
  uint64_t granularity;  // cuMem recommended granularity of this rank's GPU; 0 without cuMem
  uint64_t bytes;        // requested size, which must be the same on every rank
  int32_t device;
  int32_t requested;  // NvlinkMethod
  int32_t cuMem;
  int32_t pad;
  char busId[32];
  char cuMemWhy[kReasonBytes];
  StatusRecord status;
};

struct ExchangeRecord {
  uint64_t address;    // valid in the owner's process only
  uint64_t allocated;  // bytes
  cudaIpcMemHandle_t ipc;
};

struct FdMessage {
  uint64_t magic;
  uint64_t secret;
  uint64_t sequence;
  uint64_t allocated;
  int32_t rank;
  int32_t pad;
};

void fillStatus(moecommResult_t code, StatusRecord* record) {
  record->code = code;
  copyText(record->reason, sizeof(record->reason), code == moecommSuccess ? "" : lastErrorText());
}

// A peer's failure as seen by the others: decisions about the setup (NotSupported and the
// like) keep their code so every rank can react alike; anything else is RemoteError.
moecommResult_t peerCode(int32_t code) {
  switch (code) {
    case moecommNotSupported:
    case moecommInvalidUsage:
    case moecommInvalidArgument:
      return static_cast<moecommResult_t>(code);
    default:
      return moecommRemoteError;
  }
}

// Shares every rank's status of `step`. Returns this rank's own failure (text intact), else
// the first peer failure, else Success. *exchanged says whether the allgather went through.
moecommResult_t agree(moecommComm* comm, moecommResult_t local, const char* step, bool* exchanged = nullptr) {
  const std::string ownText = local == moecommSuccess ? "" : lastErrorText();
  StatusRecord mine{};
  fillStatus(local, &mine);
  std::vector<StatusRecord> all(comm->nranks);
  if (exchanged) *exchanged = false;
  MC_CHECK(comm->bootstrap->allgather(&mine, all.data(), sizeof(StatusRecord)));
  if (exchanged) *exchanged = true;
  if (local != moecommSuccess) return setError(local, "%s", ownText.c_str());
  for (int r = 0; r < comm->nranks; ++r) {
    if (all[r].code != moecommSuccess) {
      return setError(peerCode(all[r].code), "rank %d failed while %s: %s", r, step, all[r].reason);
    }
  }
  return moecommSuccess;
}

moecommResult_t probeCuMem(int device, uint64_t* granularity) {
  const CudaDriver* driver = nullptr;
  MC_CHECK(cudaDriver(&driver));
  CUdevice handle = 0;
  CUresult result = driver->deviceGet(&handle, device);
  MC_REQUIRE(result == CUDA_SUCCESS, moecommNotSupported, "cuDeviceGet(%d) failed: %s", device,
             cudaDriverErrorName(result));
  int vmm = 0, posixFd = 0;
  result = driver->deviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, handle);
  MC_REQUIRE(result == CUDA_SUCCESS && vmm == 1, moecommNotSupported,
             "GPU %d does not support virtual memory management (VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: %s, value %d)",
             device, cudaDriverErrorName(result), vmm);
  result =
      driver->deviceGetAttribute(&posixFd, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, handle);
  MC_REQUIRE(result == CUDA_SUCCESS && posixFd == 1, moecommNotSupported,
             "GPU %d cannot export memory as POSIX file descriptors (HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: %s, "
             "value %d)",
             device, cudaDriverErrorName(result), posixFd);
  CUmemAllocationProp prop = VmmRegion::allocationProp(handle);
  size_t recommended = 0;
  result = driver->memGetAllocationGranularity(&recommended, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
  MC_REQUIRE(result == CUDA_SUCCESS && recommended > 0, moecommNotSupported,
             "cuMemGetAllocationGranularity on GPU %d failed: %s", device, cudaDriverErrorName(result));
  *granularity = recommended;
  return moecommSuccess;
}

moecommResult_t describeRank(const moecommComm* comm, size_t bytes, RankInfo* info) {
  std::memset(info, 0, sizeof(*info));
  info->bytes = bytes;
  info->processId = mix(mix(comm->hostHashes[comm->rank], static_cast<uint64_t>(getpid())), processNonce());
  info->netNamespace = networkNamespaceId();
  std::random_device entropy;
  info->secret = (static_cast<uint64_t>(entropy()) << 32) ^ entropy();
  info->device = comm->device;
  NvlinkMethod requested = NvlinkMethod::kAuto;
  MC_CHECK(parseNvlinkShare(envString(Env::NvlinkShare), &requested));
  info->requested = static_cast<int32_t>(requested);
  MC_CUDA_CHECK(cudaDeviceGetPCIBusId(info->busId, sizeof(info->busId), comm->device));
  uint64_t granularity = 0;
  if (probeCuMem(comm->device, &granularity) == moecommSuccess) {
    info->cuMem = 1;
    info->granularity = granularity;
  } else {
    copyText(info->cuMemWhy, sizeof(info->cuMemWhy), lastErrorText());
    MC_INFO(kLogTransport, "rank %d: cumem sharing unavailable: %s", comm->rank, info->cuMemWhy);
    clearError();
  }
  return moecommSuccess;
}

std::string socketName(const moecommComm* comm, uint64_t sequence, int rank) {
  return comm->tag + "-nvl" + std::to_string(sequence) + "-r" + std::to_string(rank);
}

}  // namespace

bool nvlinkCuMemSupported(int device, std::string* why) {
  const std::string saved = lastErrorText();
  uint64_t granularity = 0;
  const bool ok = probeCuMem(device, &granularity) == moecommSuccess;
  if (!ok && why) *why = lastErrorText();
  // Put the caller's text back (the code passed here only selects nothing: setError just
  // records the sentence).
  if (saved.empty()) {
    clearError();
  } else {
    setError(moecommInternalError, "%s", saved.c_str());
  }
  return ok;
}

// The collective creation, one object per call; friend of NvlinkSymmetric.
struct NvlinkBuilder {
  NvlinkBuilder(moecommComm* owner, NvlinkSymmetric* target, uint64_t collectiveSequence)
      : comm(owner), memory(target), sequence(collectiveSequence) {}

  moecommComm* comm;
  NvlinkSymmetric* memory;
  uint64_t sequence;  // names this allocation's sockets, identically on every rank
  std::vector<RankInfo> infos;
  // Produced by the allocate step, consumed by the attach step.
  cudaIpcMemHandle_t ipcHandle{};
  UniqueFd exportedFd;
  FdListener listener;
  const CudaDriver* driver = nullptr;

  int rank() const { return comm->rank; }
  int nranks() const { return comm->nranks; }
  bool sameProcess(int r) const { return infos[r].processId == infos[rank()].processId; }
  bool sameGpu(int r) const { return std::strcmp(infos[r].busId, infos[rank()].busId) == 0; }

  // Every pair must have a peer path. Each rank checks its own direction; the agreement
  // after this step covers the rest.
  moecommResult_t checkPeerAccess() {
    for (int r = 0; r < nranks(); ++r) {
      if (r == rank() || sameGpu(r)) continue;
      int peerOrdinal = infos[r].device;
      if (!sameProcess(r)) {
        // Another process numbers GPUs by its own CUDA_VISIBLE_DEVICES: find it by bus id.
        if (cudaDeviceGetByPCIBusId(&peerOrdinal, infos[r].busId) != cudaSuccess) {
          (void)cudaGetLastError();
          MC_INFO(kLogTransport,
                  "rank %d: rank %d's GPU %s is not visible in this process; peer access cannot be checked, the "
                  "mapping will tell",
                  rank(), r, infos[r].busId);
          continue;
        }
      }
      int canAccess = 0;
      MC_CUDA_CHECK(cudaDeviceCanAccessPeer(&canAccess, comm->device, peerOrdinal));
      MC_REQUIRE(canAccess == 1, moecommNotSupported,
                 "rank %d (GPU %s) cannot access rank %d's GPU (%s): cudaDeviceCanAccessPeer reports no peer path "
                 "(NVLink or PCIe P2P) between them, and symmetric GPU memory needs one between every pair of ranks",
                 rank(), infos[rank()].busId, r, infos[r].busId);
    }
    return moecommSuccess;
  }

  moecommResult_t allocate() {
    MC_CHECK(checkPeerAccess());
    const size_t bytes = memory->bytes_;
    switch (memory->method_) {
      case NvlinkMethod::kInProcess:
      case NvlinkMethod::kIpc: {
        const size_t granularity = memory->method_ == NvlinkMethod::kIpc ? kIpcGranularity : kDirectGranularity;
        memory->allocated_ = roundUp(bytes, granularity);
        std::unique_ptr<CudaMallocRegion> region(new CudaMallocRegion());
        MC_CUDA_CHECK(cudaMalloc(&region->address, memory->allocated_));
        MC_CHECK(zeroFill(region->address, memory->allocated_));
        if (memory->method_ == NvlinkMethod::kIpc) MC_CUDA_CHECK(cudaIpcGetMemHandle(&ipcHandle, region->address));
        memory->pointers_[rank()] = region->address;
        memory->local_ = std::move(region);
        return moecommSuccess;
      }
      case NvlinkMethod::kCuMem: {
        // Every rank maps every allocation with the same size and alignment: the coarsest
        // granularity of all GPUs (powers of two, so the largest is a multiple of the rest).
        size_t granularity = 0;
        for (const RankInfo& info : infos) granularity = std::max<size_t>(granularity, info.granularity);
        memory->allocated_ = roundUp(bytes, granularity);
        MC_CHECK(cudaDriver(&driver));
        CUdevice device = 0;
        MC_CU_CHECK(driver->deviceGet(&device, comm->device), "cuDeviceGet");
        int rdma = 0;
        if (driver->deviceGetAttribute(&rdma, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED, device) !=
            CUDA_SUCCESS) {
          rdma = 0;
        }
        std::unique_ptr<VmmRegion> region(new VmmRegion(driver, memory->allocated_));
        // GPUDirect RDMA capable when the GPU allows it, so the RDMA transport can later
        // register this same buffer with a NIC.
        MC_CHECK(region->create(device, rdma == 1));
        MC_CHECK(region->map(granularity, device));
        MC_CHECK(zeroFill(region->address, memory->allocated_));
        MC_CHECK(region->exportFd(&exportedFd));
        // Listen before the agreement: once every rank passed it, every peer can connect.
        MC_CHECK(listener.listen(socketName(comm, sequence, rank()), nranks()));
        memory->pointers_[rank()] = region->address;
        memory->local_ = std::move(region);
        return moecommSuccess;
      }
      case NvlinkMethod::kAuto:
        break;
    }
    return setError(moecommInternalError, "no NVLink sharing method was chosen");
  }

  moecommResult_t enablePeerAccess(int r) {
    if (sameGpu(r)) return moecommSuccess;
    cudaError_t error = cudaDeviceEnablePeerAccess(infos[r].device, 0);
    if (error == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();  // enabled earlier (another allocation, or the application): fine
      return moecommSuccess;
    }
    if (error != cudaSuccess) {
      char call[96];
      std::snprintf(call, sizeof(call), "cudaDeviceEnablePeerAccess(GPU %d -> GPU %d of rank %d)", comm->device,
                    infos[r].device, r);
      return cudaRuntimeError(error, call);
    }
    return moecommSuccess;
  }

  // Sends our descriptor to every peer, then takes one from every peer. Sending never
  // waits for the peer to accept (the message queues on the connection), so the ranks
  // cannot deadlock on the order.
  moecommResult_t exchangeFds(std::vector<UniqueFd>* received) {
    const Deadline deadline = deadlineAfterMs(comm->timeoutMs);
    const std::atomic<bool>* aborted = &comm->aborted;
    FdMessage message{};
    message.magic = kFdMessageMagic;
    message.secret = infos[rank()].secret;
    message.sequence = sequence;
    message.allocated = memory->allocated_;
    message.rank = rank();
    std::vector<UniqueFd> outgoing;
    for (int step = 1; step < nranks(); ++step) {
      const int peer = (rank() + step) % nranks();
      UniqueFd connection;
      MC_CHECK(fdConnect(socketName(comm, sequence, peer), deadline, aborted, &connection));
      MC_CHECK(fdSend(connection.get(), &message, sizeof(message), exportedFd.get(), deadline, aborted));
      outgoing.push_back(std::move(connection));
    }
    received->clear();
    received->resize(nranks());
    for (int pending = nranks() - 1; pending > 0;) {
      UniqueFd connection, fd;
      MC_CHECK(listener.accept(deadline, aborted, &connection));
      FdMessage incoming{};
      moecommResult_t result = fdReceive(connection.get(), &incoming, sizeof(incoming), &fd, deadline, aborted);
      if (result != moecommSuccess && result != moecommRemoteError) return result;
      // Anyone on the host can connect to an abstract socket: take only what a peer of this
      // very allocation sent (its secret came through the bootstrap).
      const int from = incoming.rank;
      const bool valid = result == moecommSuccess && fd.valid() && incoming.magic == kFdMessageMagic && from >= 0 &&
                         from < nranks() && from != rank() && !(*received)[from].valid() &&
                         incoming.secret == infos[from].secret && incoming.sequence == sequence &&
                         incoming.allocated == memory->allocated_;
      if (!valid) {
        MC_WARN(kLogTransport, "rank %d: ignoring an unexpected connection on %s (%s)", rank(), listener.name().c_str(),
                result == moecommSuccess ? "bad message" : lastErrorText());
        clearError();
        continue;
      }
      (*received)[from] = std::move(fd);
      --pending;
    }
    listener.close();
    return moecommSuccess;
  }

  moecommResult_t attach(const std::vector<ExchangeRecord>& records) {
    std::vector<UniqueFd> fds;
    if (memory->method_ == NvlinkMethod::kCuMem) {
      MC_CHECK(exchangeFds(&fds));
      exportedFd.reset();
    }
    CUdevice device = 0;
    if (driver != nullptr) MC_CU_CHECK(driver->deviceGet(&device, comm->device), "cuDeviceGet");
    for (int step = 1; step < nranks(); ++step) {
      const int r = (rank() + step) % nranks();
      MC_REQUIRE(records[r].allocated == memory->allocated_, moecommInternalError,
                 "rank %d allocated %llu bytes but rank %d %zu for the same symmetric buffer", r,
                 static_cast<unsigned long long>(records[r].allocated), rank(), memory->allocated_);
      switch (memory->method_) {
        case NvlinkMethod::kCuMem: {
          std::unique_ptr<VmmRegion> region(new VmmRegion(driver, memory->allocated_));
          moecommResult_t result = region->import(fds[r].get());
          fds[r].reset();  // the import holds its own reference
          if (result == moecommSuccess) result = region->map(granularity(), device);
          if (result != moecommSuccess) {
            char context[64];
            std::snprintf(context, sizeof(context), "mapping rank %d's buffer", r);
            addErrorContext(context);
            return result;
          }
          memory->pointers_[r] = region->address;
          memory->peers_[r] = std::move(region);
          break;
        }
        case NvlinkMethod::kIpc:
          if (!sameProcess(r)) {
            std::unique_ptr<IpcRegion> region(new IpcRegion());
            cudaError_t error = cudaIpcOpenMemHandle(&region->address, records[r].ipc, cudaIpcMemLazyEnablePeerAccess);
            if (error != cudaSuccess) {
              region->address = nullptr;
              char call[80];
              std::snprintf(call, sizeof(call), "cudaIpcOpenMemHandle(rank %d's buffer)", r);
              return cudaRuntimeError(error, call);
            }
            memory->pointers_[r] = region->address;
            memory->peers_[r] = std::move(region);
            break;
          }
          // A thread of this very process: its pointer is ours too (IPC cannot open it).
          MC_CHECK(enablePeerAccess(r));
          memory->pointers_[r] = peerPointer(records[r]);
          break;
        case NvlinkMethod::kInProcess:
          MC_CHECK(enablePeerAccess(r));
          memory->pointers_[r] = peerPointer(records[r]);
          break;
        case NvlinkMethod::kAuto:
          return setError(moecommInternalError, "no NVLink sharing method was chosen");
      }
    }
    return moecommSuccess;
  }

  // A raw address from a rank of this process, valid here as it is.
  static void* peerPointer(const ExchangeRecord& record) {
    return reinterpret_cast<void*>(record.address);  // NOLINT(performance-no-int-to-ptr)
  }

  size_t granularity() const {
    size_t value = 0;
    for (const RankInfo& info : infos) value = std::max<size_t>(value, info.granularity);
    return value;
  }

  moecommResult_t run() {
    const int n = nranks();
    // Step 1: describe.
    RankInfo mine;
    moecommResult_t local = describeRank(comm, memory->bytes_, &mine);
    const std::string ownText = local == moecommSuccess ? "" : lastErrorText();
    fillStatus(local, &mine.status);
    infos.resize(n);
    MC_CHECK(comm->bootstrap->allgather(&mine, infos.data(), sizeof(RankInfo)));
    if (local != moecommSuccess) return setError(local, "%s", ownText.c_str());
    for (int r = 0; r < n; ++r) {
      if (infos[r].status.code != moecommSuccess) {
        return setError(peerCode(infos[r].status.code), "rank %d failed while describing its GPU: %s", r,
                        infos[r].status.reason);
      }
    }
    for (int r = 0; r < n; ++r) {
      MC_REQUIRE(infos[r].bytes == infos[0].bytes, moecommInvalidArgument,
                 "rank 0 asked for %llu bytes of symmetric memory but rank %d for %llu; every rank must pass the "
                 "same size",
                 static_cast<unsigned long long>(infos[0].bytes), r, static_cast<unsigned long long>(infos[r].bytes));
    }

    // Step 2: choose (identically everywhere), check, allocate.
    std::vector<NvlinkRankCaps> caps(n);
    for (int r = 0; r < n; ++r) {
      caps[r].processId = infos[r].processId;
      caps[r].netNamespace = infos[r].netNamespace;
      caps[r].cuMem = infos[r].cuMem == 1;
      caps[r].cuMemWhy = infos[r].cuMemWhy;
      caps[r].requested = static_cast<NvlinkMethod>(infos[r].requested);
    }
    // Every rank computes the same answer from the same table, so a refusal is already
    // unanimous: no agreement round is needed.
    MC_CHECK(chooseNvlinkMethod(caps, &memory->method_));
    local = allocate();
    if (local != moecommSuccess) {
      char context[64];
      std::snprintf(context, sizeof(context), "rank %d, %s, allocating", rank(), nvlinkMethodName(memory->method_));
      addErrorContext(context);
    }
    MC_CHECK(agree(comm, local, "allocating its buffer"));

    // Step 3: exchange and attach.
    ExchangeRecord record{};
    record.address = reinterpret_cast<uint64_t>(memory->pointers_[rank()]);
    record.allocated = memory->allocated_;
    record.ipc = ipcHandle;
    std::vector<ExchangeRecord> records(n);
    MC_CHECK(comm->bootstrap->allgather(&record, records.data(), sizeof(ExchangeRecord)));
    local = attach(records);
    if (local != moecommSuccess) {
      char context[64];
      std::snprintf(context, sizeof(context), "rank %d, %s, attaching peers", rank(),
                    nvlinkMethodName(memory->method_));
      addErrorContext(context);
    }
    bool exchanged = false;
    moecommResult_t result = agree(comm, local, "mapping the peers' buffers", &exchanged);
    if (result != moecommSuccess && exchanged) {
      // Some ranks may hold our buffer open: all let go, meet, and only then free.
      const std::string text = lastErrorText();
      (void)memory->detachPeers();
      (void)comm->bootstrap->barrier();
      setError(result, "%s", text.c_str());
    }
    return result;
  }
};

NvlinkSymmetric::~NvlinkSymmetric() {
  DeviceGuard guard;
  if (device_ >= 0 && cudaSetDevice(device_) != cudaSuccess) (void)cudaGetLastError();
  if (peerTable_ != nullptr && cudaFree(peerTable_) != cudaSuccess) (void)cudaGetLastError();
  peers_.clear();
  local_.reset();
}

moecommResult_t NvlinkSymmetric::detachPeers() {
  if (detached_) return moecommSuccess;
  detached_ = true;
  DeviceGuard guard;
  moecommResult_t result = moecommSuccess;
  cudaError_t error = cudaSetDevice(device_);
  if (error == cudaSuccess) error = cudaDeviceSynchronize();
  // Unmap even when the device reports an error: the mappings must go either way.
  if (error != cudaSuccess) result = cudaRuntimeError(error, "cudaDeviceSynchronize before unmapping the peers");
  for (size_t r = 0; r < pointers_.size(); ++r) {
    if (static_cast<int>(r) == rank_) continue;
    peers_[r].reset();
    pointers_[r] = nullptr;
  }
  return result;
}

moecommResult_t NvlinkSymmetric::create(moecommComm* comm, size_t bytes, std::unique_ptr<NvlinkSymmetric>* out) {
  MC_REQUIRE(out != nullptr, moecommInternalError, "NvlinkSymmetric::create without an output");
  out->reset();
  MC_REQUIRE(bytes > 0, moecommInvalidArgument, "symmetric GPU memory of 0 bytes requested");
  MC_REQUIRE(comm->backend == moecommBackendCuda && comm->device >= 0, moecommInvalidUsage,
             "symmetric GPU memory needs a communicator on the CUDA backend (this one has backend %d, device %d)",
             comm->backend, comm->device);
  MC_REQUIRE(comm->allOnOneHost(), moecommNotSupported,
             "symmetric GPU memory over NVLink needs every rank on one host, and this communicator spans several");
  DeviceGuard guard;
  std::unique_ptr<NvlinkSymmetric> memory(new NvlinkSymmetric());
  memory->rank_ = comm->rank;
  memory->device_ = comm->device;
  memory->bytes_ = bytes;
  memory->pointers_.assign(comm->nranks, nullptr);
  memory->peers_.resize(comm->nranks);
  NvlinkBuilder builder(comm, memory.get(), comm->collectiveSequence++);
  const cudaError_t selected = cudaSetDevice(comm->device);
  if (selected != cudaSuccess) {
    // A rank that cannot even select its device still takes part in the first exchange, so
    // its peers learn of it there instead of waiting.
    const moecommResult_t result = cudaRuntimeError(selected, "cudaSetDevice");
    const std::string text = lastErrorText();
    RankInfo failed{};
    fillStatus(result, &failed.status);
    std::vector<RankInfo> ignored(comm->nranks);
    (void)comm->bootstrap->allgather(&failed, ignored.data(), sizeof(RankInfo));
    return setError(result, "%s", text.c_str());
  }
  MC_CHECK(builder.run());
  // The device copy of the peer pointers is optional (kernels that need it fall back without
  // it), so a failure here is logged, not returned: the collective already succeeded everywhere.
  void* table = nullptr;
  const size_t tableBytes = sizeof(void*) * memory->pointers_.size();
  cudaError_t tableError = cudaMalloc(&table, tableBytes);
  if (tableError == cudaSuccess)
    tableError = cudaMemcpy(table, memory->pointers_.data(), tableBytes, cudaMemcpyHostToDevice);
  if (tableError == cudaSuccess) {
    memory->peerTable_ = static_cast<void**>(table);
  } else {
    (void)cudaGetLastError();
    if (table != nullptr) (void)cudaFree(table);
    MC_WARN(kLogMem,
            "rank %d: no device table of the peers' pointers (%s); EP calls will not read this memory directly",
            comm->rank, cudaGetErrorString(tableError));
  }
  MC_INFO(kLogMem, "rank %d: symmetric GPU memory of %zu bytes (%zu allocated) on GPU %d shared with %d ranks via %s",
          comm->rank, bytes, memory->allocated_, comm->device, comm->nranks, memory->method());
  *out = std::move(memory);
  return moecommSuccess;
}

#endif  // MOECOMM_HAVE_CUDA

}  // namespace moecomm
