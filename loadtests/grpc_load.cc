// The gRPC load driver `rac bench` uses: prepared, serialised ModelInferRequests sent from `concurrency`
// connections, each with one call in flight, on one thread and one completion queue (what wrk is for HTTP:
// a native client whose own CPU stays small beside the server's on the same cores).
//
//   rac-grpc-load TARGET REQUESTS CONCURRENCY SECONDS OUT.json
//
// REQUESTS holds `<length>\n<bytes>` records (loadtests/overload.py write_bodies). Each connection is its own
// channel with a local subchannel pool (else channels to one address share one connection), so the kernel
// spreads them over the server processes. Calls go through the generic stub: bytes in, bytes out, nothing
// parsed. OUT gets what loadtests/v2load.py writes: requests, seconds, req_per_s, errors by status code,
// non_ok, p50/p90/p99/max latency in ms, and the CPU this process used while measuring (client_cores).
// Built by `make grpc-load` (Debian's libgrpc++-dev).

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
const char* kMethod = "/inference.GRPCInferenceService/ModelInfer";

std::vector<grpc::Slice> ReadRequests(const char* path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<grpc::Slice> out;
  std::string header;
  while (std::getline(in, header)) {
    size_t length = std::stoul(header.substr(0, header.find(' ')));
    std::string body(length, '\0');
    in.read(body.data(), static_cast<std::streamsize>(length));
    out.emplace_back(body);
  }
  return out;
}

double CpuSeconds() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

// One connection's call in flight: its context, reader, answer and when it was sent.
struct Call {
  int slot = 0;
  grpc::ClientContext context;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
  Clock::time_point sent;
};

class Driver {
 public:
  Driver(const std::string& target, std::vector<grpc::Slice> requests, int concurrency)
      : requests_(std::move(requests)) {
    grpc::ChannelArguments args;
    args.SetInt("grpc.use_local_subchannel_pool", 1);
    args.SetMaxReceiveMessageSize(-1);
    for (int i = 0; i < concurrency; ++i) {
      auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
      stubs_.push_back(std::make_unique<grpc::GenericStub>(channel));
    }
  }

  // Sends one call on each connection and waits for its answer: connected, and answering, before the clock.
  bool WarmUp() {
    for (size_t i = 0; i < stubs_.size(); ++i) Send(static_cast<int>(i));
    bool ok = true;
    for (size_t i = 0; i < stubs_.size(); ++i) {
      void* tag = nullptr;
      bool done = false;
      cq_.Next(&tag, &done);
      std::unique_ptr<Call> call(static_cast<Call*>(tag));
      if (!done || !call->status.ok()) {
        std::fprintf(stderr, "warm-up call failed: %s\n", call->status.error_message().c_str());
        ok = false;
      }
    }
    return ok;
  }

  void Run(double seconds) {
    auto start = Clock::now();
    auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    double cpu = CpuSeconds();
    for (size_t i = 0; i < stubs_.size(); ++i) Send(static_cast<int>(i));
    size_t in_flight = stubs_.size();
    while (in_flight > 0) {
      void* tag = nullptr;
      bool done = false;
      if (!cq_.Next(&tag, &done)) break;
      std::unique_ptr<Call> call(static_cast<Call*>(tag));
      auto now = Clock::now();
      if (done && call->status.ok()) {
        latencies_.push_back(std::chrono::duration<double>(now - call->sent).count());
      } else {
        errors_[done ? StatusName(call->status.error_code()) : "CANCELLED"] += 1;
      }
      if (now < deadline) {
        Send(call->slot);
      } else {
        --in_flight;
      }
    }
    elapsed_ = std::chrono::duration<double>(Clock::now() - start).count();
    cores_ = (CpuSeconds() - cpu) / elapsed_;
  }

  std::string Json() {
    std::sort(latencies_.begin(), latencies_.end());
    auto pct = [&](double q) {  // linear between the closest ranks, as numpy.percentile (the Python driver's)
      if (latencies_.empty()) return 0.0;
      double rank = q / 100.0 * static_cast<double>(latencies_.size() - 1);
      size_t low = static_cast<size_t>(rank);
      size_t high = std::min(low + 1, latencies_.size() - 1);
      return (latencies_[low] + (rank - static_cast<double>(low)) * (latencies_[high] - latencies_[low])) * 1000.0;
    };
    long non_ok = 0;
    std::ostringstream errors;
    errors << "{";
    for (auto it = errors_.begin(); it != errors_.end(); ++it) {
      errors << (it == errors_.begin() ? "" : ", ") << "\"" << it->first << "\": " << it->second;
      non_ok += it->second;
    }
    errors << "}";
    std::ostringstream out;
    out << "{\"requests\": " << latencies_.size() << ", \"seconds\": " << elapsed_
        << ", \"req_per_s\": " << latencies_.size() / elapsed_ << ", \"errors\": " << errors.str()
        << ", \"non_ok\": " << non_ok << ", \"p50_ms\": " << pct(50) << ", \"p90_ms\": " << pct(90)
        << ", \"p99_ms\": " << pct(99) << ", \"max_ms\": " << (latencies_.empty() ? 0.0 : latencies_.back() * 1000.0)
        << ", \"client_cores\": " << cores_ << ", \"processes\": 1, \"driver\": \"native\"}";
    return out.str();
  }

 private:
  // One call on connection `slot`, given 10 s (the warm-up's too: a server that never answers fails the run).
  void Send(int slot) {
    auto* call = new Call;
    call->slot = slot;
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::ByteBuffer request(&requests_[next_++ % requests_.size()], 1);
    call->sent = Clock::now();
    call->reader = stubs_[slot]->PrepareUnaryCall(&call->context, kMethod, request, &cq_);
    call->reader->StartCall();
    call->reader->Finish(&call->response, &call->status, call);
  }

  static std::string StatusName(grpc::StatusCode code) {
    static const std::map<int, std::string> names = {
        {1, "CANCELLED"}, {2, "UNKNOWN"}, {3, "INVALID_ARGUMENT"}, {4, "DEADLINE_EXCEEDED"}, {5, "NOT_FOUND"},
        {7, "PERMISSION_DENIED"}, {8, "RESOURCE_EXHAUSTED"}, {12, "UNIMPLEMENTED"}, {13, "INTERNAL"},
        {14, "UNAVAILABLE"}, {16, "UNAUTHENTICATED"}};
    auto it = names.find(static_cast<int>(code));
    return it == names.end() ? "CODE_" + std::to_string(static_cast<int>(code)) : it->second;
  }

  std::vector<grpc::Slice> requests_;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  grpc::CompletionQueue cq_;
  size_t next_ = 0;
  std::vector<double> latencies_;
  std::map<std::string, long> errors_;
  double elapsed_ = 0, cores_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s TARGET REQUESTS CONCURRENCY SECONDS OUT.json\n", argv[0]);
    return 2;
  }
  auto requests = ReadRequests(argv[2]);
  if (requests.empty()) {
    std::fprintf(stderr, "%s holds no requests\n", argv[2]);
    return 2;
  }
  Driver driver(argv[1], std::move(requests), std::stoi(argv[3]));
  if (!driver.WarmUp()) return 1;
  driver.Run(std::stod(argv[4]));
  std::ofstream out(argv[5]);
  out << driver.Json() << "\n";
  out.close();
  if (!out) {
    std::fprintf(stderr, "could not write %s\n", argv[5]);
    return 1;
  }
  return 0;
}
