import java.util.Map;
import java.util.Optional;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.clients.admin.ListTopicsOptions;

/**
 * Readiness probe used by kafka.sh: waits until the broker at BOOTSTRAP answers
 * metadata requests (DescribeCluster + ListTopics), in one JVM.
 *
 * <pre>java -cp '.cache/probe:.cache/lib/*' KafkaProbe BOOTSTRAP TIMEOUT_MS [PID]</pre>
 *
 * Exit codes: 0 ready, 1 timed out, 2 the broker process PID exited first.
 */
public final class KafkaProbe {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: KafkaProbe BOOTSTRAP TIMEOUT_MS [PID]");
            System.exit(64);
        }
        String bootstrap = args[0];
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(Long.parseLong(args[1]));
        Optional<ProcessHandle> broker =
                args.length > 2 ? ProcessHandle.of(Long.parseLong(args[2])) : Optional.empty();
        if (args.length > 2 && broker.isEmpty()) {
            System.err.println("broker process " + args[2] + " is not running");
            System.exit(2);
        }
        Map<String, Object> conf = Map.of(
                AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap,
                AdminClientConfig.CLIENT_ID_CONFIG, "kafka-sh-probe",
                AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, 2000,
                AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, 3000,
                AdminClientConfig.RECONNECT_BACKOFF_MS_CONFIG, 100,
                AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, 500,
                AdminClientConfig.RETRY_BACKOFF_MS_CONFIG, 100);
        String last = "no attempt";
        try (Admin admin = Admin.create(conf)) {
            while (System.nanoTime() < deadline) {
                if (broker.isPresent() && !broker.get().isAlive()) {
                    System.err.println("broker process exited before becoming ready");
                    System.exit(2);
                }
                try {
                    DescribeClusterResult cluster = admin.describeCluster();
                    String clusterId = cluster.clusterId().get(3, TimeUnit.SECONDS);
                    int nodes = cluster.nodes().get(3, TimeUnit.SECONDS).size();
                    int topics = admin.listTopics(new ListTopicsOptions().listInternal(true))
                            .names().get(3, TimeUnit.SECONDS).size();
                    if (nodes > 0) {
                        System.out.println("ready cluster_id=" + clusterId + " nodes=" + nodes
                                + " topics=" + topics);
                        return;
                    }
                    last = "no live brokers in metadata";
                } catch (Exception e) {
                    last = e.getClass().getSimpleName() + ": " + e.getMessage();
                }
                Thread.sleep(200);
            }
        }
        System.err.println("timed out waiting for " + bootstrap + " (last error: " + last + ")");
        System.exit(1);
    }
}
