package deploy_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

const namespace = "cloud-connector"

// notInKustomization are the manifests deliberately left out of
// kustomization.yaml, with the reason (each file's header says more).
var notInKustomization = map[string]string{
	"database-secret.yaml":       "placeholder; the real Secret is created out of band",
	"internal-token-secret.yaml": "placeholder; the real Secret is created out of band",
	"migrate-job.yaml":           "immutable Job, run before each rollout",
}

// object is one Kubernetes document; decode reads the rest of it.
type object struct {
	file       string
	doc        []byte
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   objectMeta `json:"metadata"`
}

type objectMeta struct {
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

func (o object) String() string {
	return fmt.Sprintf("%s %s/%s (%s)", o.file, o.Kind, o.Metadata.Name, o.APIVersion)
}

func (o object) decode(t testing.TB, v any) {
	t.Helper()
	if err := yaml.Unmarshal(o.doc, v); err != nil {
		t.Fatalf("%s: %v", o, err)
	}
}

// The subset of the API types the checks read.
type (
	labelSelector struct {
		MatchLabels map[string]string `json:"matchLabels"`
	}
	// workload is a Deployment or a Job.
	workload struct {
		Spec struct {
			Replicas *int32        `json:"replicas"`
			Selector labelSelector `json:"selector"`
			Template struct {
				Metadata objectMeta `json:"metadata"`
				Spec     podSpec    `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	podSpec struct {
		TerminationGracePeriodSeconds *int64 `json:"terminationGracePeriodSeconds"`
		SecurityContext               struct {
			RunAsNonRoot *bool `json:"runAsNonRoot"`
		} `json:"securityContext"`
		TopologySpreadConstraints []json.RawMessage `json:"topologySpreadConstraints"`
		Containers                []container       `json:"containers"`
		Volumes                   []volume          `json:"volumes"`
	}
	volume struct {
		Name      string `json:"name"`
		ConfigMap *struct {
			Name string `json:"name"`
		} `json:"configMap"`
		Secret *struct {
			SecretName string `json:"secretName"`
		} `json:"secret"`
		EmptyDir *struct {
			SizeLimit string `json:"sizeLimit"`
		} `json:"emptyDir"`
	}
	container struct {
		Name    string   `json:"name"`
		Image   string   `json:"image"`
		Command []string `json:"command"`
		Args    []string `json:"args"`
		Env     []struct {
			Name      string `json:"name"`
			ValueFrom *struct {
				SecretKeyRef    *keyRef `json:"secretKeyRef"`
				ConfigMapKeyRef *keyRef `json:"configMapKeyRef"`
			} `json:"valueFrom"`
		} `json:"env"`
		EnvFrom []struct {
			ConfigMapRef *keyRef `json:"configMapRef"`
			SecretRef    *keyRef `json:"secretRef"`
		} `json:"envFrom"`
		Ports []struct {
			Name          string `json:"name"`
			ContainerPort int32  `json:"containerPort"`
		} `json:"ports"`
		ReadinessProbe *probe `json:"readinessProbe"`
		LivenessProbe  *probe `json:"livenessProbe"`
		StartupProbe   *probe `json:"startupProbe"`
		Lifecycle      *struct {
			PreStop *struct {
				Sleep *struct {
					Seconds int64 `json:"seconds"`
				} `json:"sleep"`
			} `json:"preStop"`
		} `json:"lifecycle"`
		Resources struct {
			Requests map[string]string `json:"requests"`
			Limits   map[string]string `json:"limits"`
		} `json:"resources"`
		SecurityContext *struct {
			AllowPrivilegeEscalation *bool `json:"allowPrivilegeEscalation"`
			ReadOnlyRootFilesystem   *bool `json:"readOnlyRootFilesystem"`
			RunAsNonRoot             *bool `json:"runAsNonRoot"`
			Capabilities             *struct {
				Drop []string `json:"drop"`
			} `json:"capabilities"`
		} `json:"securityContext"`
		VolumeMounts []struct {
			Name      string `json:"name"`
			MountPath string `json:"mountPath"`
		} `json:"volumeMounts"`
	}
	keyRef struct {
		Name string `json:"name"`
		Key  string `json:"key"`
	}
	probe struct {
		HTTPGet *struct {
			Path string      `json:"path"`
			Port intOrString `json:"port"`
		} `json:"httpGet"`
	}
	service struct {
		Spec struct {
			Selector map[string]string `json:"selector"`
			Ports    []struct {
				Name        string      `json:"name"`
				Port        int32       `json:"port"`
				TargetPort  intOrString `json:"targetPort"`
				AppProtocol string      `json:"appProtocol"`
			} `json:"ports"`
		} `json:"spec"`
	}
	ingress struct {
		Spec struct {
			TLS []struct {
				Hosts []string `json:"hosts"`
			} `json:"tls"`
			Rules []struct {
				Host string `json:"host"`
				HTTP struct {
					Paths []struct {
						Path     string `json:"path"`
						PathType string `json:"pathType"`
						Backend  struct {
							Service *struct {
								Name string `json:"name"`
								Port struct {
									Name   string `json:"name"`
									Number int32  `json:"number"`
								} `json:"port"`
							} `json:"service"`
						} `json:"backend"`
					} `json:"paths"`
				} `json:"http"`
			} `json:"rules"`
		} `json:"spec"`
	}
	configMap struct {
		Data map[string]string `json:"data"`
	}
	secret struct {
		Data       map[string]string `json:"data"`
		StringData map[string]string `json:"stringData"`
	}
	pdb struct {
		Spec struct {
			Selector labelSelector `json:"selector"`
		} `json:"spec"`
	}
	hpa struct {
		Spec struct {
			ScaleTargetRef struct {
				Kind string `json:"kind"`
				Name string `json:"name"`
			} `json:"scaleTargetRef"`
			MinReplicas *int32 `json:"minReplicas"`
			MaxReplicas int32  `json:"maxReplicas"`
		} `json:"spec"`
	}
	networkPolicy struct {
		Spec struct {
			PodSelector labelSelector `json:"podSelector"`
			Ingress     []struct {
				From []struct {
					PodSelector       *labelSelector `json:"podSelector"`
					NamespaceSelector *labelSelector `json:"namespaceSelector"`
				} `json:"from"`
				Ports []struct {
					Port intOrString `json:"port"`
				} `json:"ports"`
			} `json:"ingress"`
		} `json:"spec"`
	}
	kustomization struct {
		Resources []string `json:"resources"`
	}
)

// intOrString is a port given by number or by name.
type intOrString struct {
	Int int32
	Str string
}

func (v *intOrString) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		return json.Unmarshal(b, &v.Str)
	}
	return json.Unmarshal(b, &v.Int)
}

func (v intOrString) String() string {
	if v.Str != "" {
		return v.Str
	}
	return strconv.Itoa(int(v.Int))
}

// manifests is every document of every k8s/*.yaml file.
type manifests struct {
	all   []object
	files []string
}

func loadManifests(t testing.TB) manifests {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(k8sDir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no manifests in %s", k8sDir)
	}
	var m manifests
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		m.files = append(m.files, filepath.Base(file))
		b = bytes.ReplaceAll(b, []byte("\r\n"), []byte("\n"))
		docs := bytes.Split(b, []byte("\n---\n"))
		for i, doc := range docs {
			if i < len(docs)-1 {
				doc = append(doc, '\n') // the separator took the document's last line break
			}
			o := object{file: fmt.Sprintf("%s#%d", filepath.Base(file), i), doc: doc}
			var raw map[string]any
			if err := yaml.Unmarshal(doc, &raw); err != nil {
				t.Fatalf("%s: %v", o.file, err)
			}
			if raw == nil {
				t.Fatalf("%s: empty document", o.file)
			}
			if err := yaml.Unmarshal(doc, &o); err != nil {
				t.Fatalf("%s: %v", o.file, err)
			}
			m.all = append(m.all, o)
		}
	}
	return m
}

func (m manifests) ofKind(kind string) []object {
	var out []object
	for _, o := range m.all {
		if o.Kind == kind {
			out = append(out, o)
		}
	}
	return out
}

func (m manifests) find(kind, name string) (object, bool) {
	for _, o := range m.all {
		if o.Kind == kind && o.Metadata.Name == name {
			return o, true
		}
	}
	return object{}, false
}

// selects reports whether selector (non-empty) matches labels.
func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// component is a Deployment with what the checks learn about it.
type component struct {
	obj    object
	w      workload
	c      container // the single container
	binary string    // "decision", "ai", "cicd"
}

func (m manifests) components(t testing.TB) []component {
	t.Helper()
	var out []component
	for _, o := range m.ofKind("Deployment") {
		var w workload
		o.decode(t, &w)
		if n := len(w.Spec.Template.Spec.Containers); n != 1 {
			t.Fatalf("%s: %d containers, want 1", o, n)
		}
		c := w.Spec.Template.Spec.Containers[0]
		if len(c.Command) == 0 {
			t.Fatalf("%s: no command; the image has no entrypoint", o)
		}
		out = append(out, component{obj: o, w: w, c: c, binary: path.Base(c.Command[0])})
	}
	return out
}

// port resolves a probe or Service target port (name or number) to a
// container port number.
func (c container) port(p intOrString) (int32, bool) {
	for _, cp := range c.Ports {
		if (p.Str != "" && cp.Name == p.Str) || (p.Str == "" && cp.ContainerPort == p.Int) {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

// configPath is the -config argument. The manifests pass the config path
// as a flag, not as CONFIG_FILE, so it shows in `ps` and the pod spec alike.
func (c container) configPath() string {
	for i, a := range c.Args {
		if (a == "-config" || a == "--config") && i+1 < len(c.Args) {
			return c.Args[i+1]
		}
		if v, ok := strings.CutPrefix(a, "-config="); ok {
			return v
		}
	}
	return ""
}

// mountOf returns the volume mounted at the directory holding file.
func (cp component) mountOf(file string) (volume, bool) {
	for _, vm := range cp.c.VolumeMounts {
		if file == vm.MountPath || strings.HasPrefix(file, strings.TrimSuffix(vm.MountPath, "/")+"/") {
			for _, v := range cp.w.Spec.Template.Spec.Volumes {
				if v.Name == vm.Name {
					return v, true
				}
			}
		}
	}
	return volume{}, false
}

func TestManifestsWellFormed(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	for _, o := range m.all {
		if o.APIVersion == "" || o.Kind == "" || o.Metadata.Name == "" {
			t.Errorf("%s: apiVersion, kind and metadata.name are required", o)
		}
		switch o.Kind {
		case "Namespace":
			if o.Metadata.Name != namespace {
				t.Errorf("%s: want namespace %s", o, namespace)
			}
		case "Kustomization":
		default:
			if o.Metadata.Namespace != namespace {
				t.Errorf("%s: metadata.namespace %q, want %s", o, o.Metadata.Namespace, namespace)
			}
		}
	}
	seen := map[string]object{}
	for _, o := range m.all {
		key := o.Kind + "/" + o.Metadata.Name
		if prev, ok := seen[key]; ok {
			t.Errorf("%s duplicates %s", o, prev)
		}
		seen[key] = o
	}
}

func TestKustomization(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	o, ok := m.find("Kustomization", "cloud-connector")
	if !ok {
		t.Fatal("no kustomization.yaml")
	}
	var k kustomization
	o.decode(t, &k)
	want := slices.DeleteFunc(slices.Clone(m.files), func(f string) bool {
		_, skip := notInKustomization[f]
		return skip || f == "kustomization.yaml"
	})
	got := slices.Sorted(slices.Values(k.Resources))
	if !slices.Equal(got, want) {
		t.Errorf("kustomization resources %v, want %v (left out on purpose: %v)", got, want,
			slices.Sorted(maps.Keys(notInKustomization)))
	}
}

func TestConfigMapsMatchConfigFiles(t *testing.T) {
	// Not parallel: -update rewrites a file other tests read.
	cs := loadConfigs(t)
	file := filepath.Join(k8sDir, "configmaps.yaml")
	if *update {
		if err := os.WriteFile(file, renderConfigMaps(t, cs), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	m := loadManifests(t)
	for name, content := range cs.raw {
		cmName := configMapName(t, name)
		o, ok := m.find("ConfigMap", cmName)
		if !ok {
			t.Errorf("no ConfigMap %s for %s/%s", cmName, configDir, name)
			continue
		}
		var cm configMap
		o.decode(t, &cm)
		if cm.Data[name] != content {
			t.Errorf("%s: data[%s] differs from %s/%s; run: go test ./deploy -run %s -update",
				o, name, configDir, name, t.Name())
		}
	}
}

// configMapName is the ConfigMap that carries a config file.
func configMapName(t testing.TB, file string) string {
	t.Helper()
	if file == decisionConfigFile {
		return "decision-config"
	}
	return "gateway-" + strings.TrimSuffix(file, ".yaml") + "-config"
}

func renderConfigMaps(t testing.TB, cs configs) []byte {
	t.Helper()
	var b bytes.Buffer
	b.WriteString("# Generated from deploy/config/*.yaml by\n" +
		"#   go test ./deploy -run TestConfigMapsMatchConfigFiles -update\n" +
		"# Edit the files in deploy/config, not this one: the test fails on drift.\n")
	for i, name := range slices.Sorted(maps.Keys(cs.raw)) {
		if i > 0 {
			b.WriteString("---\n")
		}
		cm := configMapName(t, name)
		fmt.Fprintf(&b, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: %s\n  namespace: %s\n"+
			"  labels:\n    app.kubernetes.io/name: %s\n    app.kubernetes.io/part-of: cloud-connector\n"+
			"data:\n  %s: |\n", cm, namespace, strings.TrimSuffix(cm, "-config"), name)
		for _, line := range strings.SplitAfter(strings.TrimSuffix(cs.raw[name], "\n"), "\n") {
			if strings.TrimSpace(line) != "" {
				b.WriteString("    ")
			}
			b.WriteString(line)
		}
		b.WriteString("\n")
	}
	return b.Bytes()
}

func TestWorkloads(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	var objs []object
	objs = append(objs, m.ofKind("Deployment")...)
	objs = append(objs, m.ofKind("Job")...)
	binaries := dockerBinaries(t)
	for _, o := range objs {
		var w workload
		o.decode(t, &w)
		ps := w.Spec.Template.Spec
		if o.Kind == "Deployment" && !selects(w.Spec.Selector.MatchLabels, w.Spec.Template.Metadata.Labels) {
			t.Errorf("%s: selector does not match the pod labels", o)
		}
		volumes := map[string]volume{}
		for _, v := range ps.Volumes {
			volumes[v.Name] = v
			if v.ConfigMap != nil {
				requireConfigMap(t, m, o, v.ConfigMap.Name, "")
			}
			if v.Secret != nil {
				requireSecret(t, m, o, v.Secret.SecretName, "")
			}
		}
		if len(ps.Containers) == 0 {
			t.Errorf("%s: no containers", o)
		}
		for _, c := range ps.Containers {
			at := fmt.Sprintf("%s container %s", o, c.Name)
			if len(c.Command) == 0 || !slices.Contains(binaries, c.Command[0]) {
				t.Errorf("%s: command %q: want one of the image's binaries %v", at, c.Command, binaries)
			}
			for _, e := range c.Env {
				if e.ValueFrom == nil {
					continue
				}
				if r := e.ValueFrom.SecretKeyRef; r != nil {
					requireSecret(t, m, o, r.Name, r.Key)
				}
				if r := e.ValueFrom.ConfigMapKeyRef; r != nil {
					requireConfigMap(t, m, o, r.Name, r.Key)
				}
			}
			for _, e := range c.EnvFrom {
				if e.ConfigMapRef != nil {
					requireConfigMap(t, m, o, e.ConfigMapRef.Name, "")
				}
				if e.SecretRef != nil {
					requireSecret(t, m, o, e.SecretRef.Name, "")
				}
			}
			for _, vm := range c.VolumeMounts {
				if _, ok := volumes[vm.Name]; !ok {
					t.Errorf("%s: mounts undeclared volume %s", at, vm.Name)
				}
			}
			for _, r := range []string{"cpu", "memory"} {
				if c.Resources.Requests[r] == "" || c.Resources.Limits[r] == "" {
					t.Errorf("%s: resources.requests and limits need %s", at, r)
				}
			}
			checkSecurityContext(t, at, ps, c)
			for _, p := range []*probe{c.ReadinessProbe, c.LivenessProbe, c.StartupProbe} {
				if p == nil || p.HTTPGet == nil {
					continue
				}
				if _, ok := c.port(p.HTTPGet.Port); !ok {
					t.Errorf("%s: probe %s on port %s, which the container does not declare", at, p.HTTPGet.Path, p.HTTPGet.Port)
				}
			}
		}
	}
}

func requireConfigMap(t *testing.T, m manifests, from object, name, key string) {
	t.Helper()
	o, ok := m.find("ConfigMap", name)
	if !ok {
		t.Errorf("%s: references ConfigMap %s, which no manifest defines", from, name)
		return
	}
	var cm configMap
	o.decode(t, &cm)
	if _, ok := cm.Data[key]; key != "" && !ok {
		t.Errorf("%s: references key %s of ConfigMap %s, which it does not have", from, key, name)
	}
}

func requireSecret(t *testing.T, m manifests, from object, name, key string) {
	t.Helper()
	o, ok := m.find("Secret", name)
	if !ok {
		t.Errorf("%s: references Secret %s, which no manifest (placeholder) defines", from, name)
		return
	}
	var s secret
	o.decode(t, &s)
	_, inData := s.Data[key]
	_, inString := s.StringData[key]
	if key != "" && !inData && !inString {
		t.Errorf("%s: references key %s of Secret %s, which the placeholder does not document", from, key, name)
	}
}

func checkSecurityContext(t *testing.T, at string, ps podSpec, c container) {
	t.Helper()
	sc := c.SecurityContext
	nonRoot := ps.SecurityContext.RunAsNonRoot
	if sc != nil && sc.RunAsNonRoot != nil {
		nonRoot = sc.RunAsNonRoot
	}
	switch {
	case nonRoot == nil || !*nonRoot:
		t.Errorf("%s: runAsNonRoot must be true", at)
	case sc == nil:
		t.Errorf("%s: no securityContext", at)
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Errorf("%s: readOnlyRootFilesystem must be true", at)
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Errorf("%s: allowPrivilegeEscalation must be false", at)
	case sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL"):
		t.Errorf("%s: capabilities must drop ALL", at)
	}
}

// TestDeployments checks each Deployment against the config it mounts:
// ports, probes, shutdown timing, spool, replicas and spreading.
func TestDeployments(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	cs := loadConfigs(t)
	hpas := map[string]hpa{}
	for _, o := range m.ofKind("HorizontalPodAutoscaler") {
		var h hpa
		o.decode(t, &h)
		if h.Spec.ScaleTargetRef.Kind != "Deployment" {
			t.Errorf("%s: scales a %s", o, h.Spec.ScaleTargetRef.Kind)
		}
		if _, ok := m.find("Deployment", h.Spec.ScaleTargetRef.Name); !ok {
			t.Errorf("%s: scales Deployment %s, which does not exist", o, h.Spec.ScaleTargetRef.Name)
		}
		if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas < 2 || h.Spec.MaxReplicas <= *h.Spec.MinReplicas {
			t.Errorf("%s: want minReplicas >= 2 and maxReplicas above it", o)
		}
		hpas[h.Spec.ScaleTargetRef.Name] = h
	}
	seen := map[string]bool{}
	for _, cp := range m.components(t) {
		t.Run(cp.obj.Metadata.Name, func(t *testing.T) {
			seen[cp.binary] = true
			checkDeployment(t, m, cs, cp, hpas)
		})
	}
	for name := range cs.gateways {
		if !seen[name] {
			t.Errorf("no Deployment runs the %s gateway", name)
		}
	}
	if !seen["decision"] {
		t.Error("no Deployment runs the decision service")
	}
}

func checkDeployment(t *testing.T, m manifests, cs configs, cp component, hpas map[string]hpa) {
	o, c, ps := cp.obj, cp.c, cp.w.Spec.Template.Spec

	// The config file: -config points into a ConfigMap volume whose key is
	// one of deploy/config (TestConfigMapsMatchConfigFiles keeps the
	// content equal).
	cfgPath := c.configPath()
	want := cp.binary + ".yaml"
	if path.Base(cfgPath) != want {
		t.Fatalf("-config %q: want a path ending in %s", cfgPath, want)
	}
	v, ok := cp.mountOf(cfgPath)
	if !ok || v.ConfigMap == nil {
		t.Fatalf("-config %s is not on a mounted ConfigMap", cfgPath)
	}
	if v.ConfigMap.Name != configMapName(t, want) {
		t.Errorf("config volume from ConfigMap %s, want %s", v.ConfigMap.Name, configMapName(t, want))
	}
	requireConfigMap(t, m, o, v.ConfigMap.Name, want)

	var listen, adminListen string
	var drain time.Duration
	switch g, isGateway := cs.gateways[cp.binary]; {
	case cp.binary == "decision":
		d := cs.decision.WithDefaults()
		listen, adminListen, drain = d.Listen, d.AdminListen, d.ShutdownDrain.D()+adminDrain+decisionSpanExport
	case isGateway:
		g = g.WithDefaults()
		listen, adminListen, drain = g.Listen, g.AdminListen, g.ShutdownDrain.D()+adminDrain+gatewayCloseBound
		if g.Name != cp.binary {
			t.Errorf("%s runs %s with a config named %q", o, cp.binary, g.Name)
		}
		if v, ok := cp.mountOf(g.UsageSpoolDir); !ok || v.EmptyDir == nil {
			t.Errorf("usage_spool_dir %s is not on an emptyDir (the root filesystem is read-only)", g.UsageSpoolDir)
		} else if limit, err := quantityBytes(v.EmptyDir.SizeLimit); err != nil {
			t.Errorf("usage spool emptyDir sizeLimit: %v", err)
		} else if g.UsageSpoolMaxBytes <= 0 || g.UsageSpoolMaxBytes > limit*3/4 {
			// The bound must leave room for the last spill and the
			// shutdown spool, or the kubelet evicts the pod, spool and all.
			t.Errorf("usage_spool_max_bytes %d: set it to at most 3/4 of the spool emptyDir's sizeLimit %s", g.UsageSpoolMaxBytes, v.EmptyDir.SizeLimit)
		}
		if g.InternalToken != nil {
			// Every replica must sign with the same key: from a Secret.
			for _, f := range g.InternalToken.KeyFiles {
				v, ok := cp.mountOf(f)
				if !ok || v.Secret == nil {
					t.Errorf("internal_token key file %s is not on a mounted Secret", f)
					continue
				}
				requireSecret(t, m, o, v.Secret.SecretName, path.Base(f))
			}
		}
		if l := o.Metadata.Labels["app.kubernetes.io/component"]; l != "gateway" {
			t.Errorf("component label %q: the decision NetworkPolicy admits component=gateway", l)
		}
	default:
		t.Fatalf("command %s is neither the decision service nor a configured gateway", c.Command[0])
	}

	// Ports: the container declares what the config listens on.
	publicPort, adminPort := mustPort(t, listen), mustPort(t, adminListen)
	if _, ok := c.port(intOrString{Int: publicPort}); !ok {
		t.Errorf("config listens on %s; the container does not declare port %d", listen, publicPort)
	}
	if _, ok := c.port(intOrString{Int: adminPort}); !ok {
		t.Errorf("config admin_listen %s; the container does not declare port %d", adminListen, adminPort)
	}

	// Probes: health on the admin port.
	for _, p := range []struct {
		name string
		p    *probe
		path string
	}{{"readiness", c.ReadinessProbe, "/readyz"}, {"liveness", c.LivenessProbe, "/healthz"}} {
		if p.p == nil || p.p.HTTPGet == nil {
			t.Errorf("no %s httpGet probe", p.name)
			continue
		}
		port, ok := c.port(p.p.HTTPGet.Port)
		if !ok {
			t.Errorf("%s probe port %s is not a container port", p.name, p.p.HTTPGet.Port)
		}
		if port != adminPort || p.p.HTTPGet.Path != p.path {
			t.Errorf("%s probe %s on port %d, want %s on the admin port %d", p.name, p.p.HTTPGet.Path, port, p.path, adminPort)
		}
	}

	// Shutdown: the endpoint leaves load balancers during preStop, then
	// SIGTERM starts the public drain bounded by shutdown_drain, after which
	// the admin port drains (adminDrain), gateways return leases, flush
	// usage and export their last spans (gatewayCloseBound), and the
	// decision service exports its last spans (decisionSpanExport); the
	// grace period covers all of it with a margin, or the kubelet's SIGKILL
	// cuts the last step.
	var sleep time.Duration
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
		t.Error("no preStop sleep: SIGTERM would arrive while the endpoint still receives traffic")
	} else {
		sleep = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
	}
	if ps.TerminationGracePeriodSeconds == nil {
		t.Error("terminationGracePeriodSeconds unset (default 30s)")
	} else if grace := time.Duration(*ps.TerminationGracePeriodSeconds) * time.Second; grace < sleep+drain+graceMargin {
		t.Errorf("terminationGracePeriodSeconds %s must be at least preStop sleep %s + shutdown %s + margin %s "+
			"(shutdown is shutdown_drain + %s admin drain, plus %s for gateways to return leases, flush usage "+
			"and export spans, or %s for the decision service to export spans)",
			grace, sleep, drain, graceMargin, adminDrain, gatewayCloseBound, decisionSpanExport)
	}

	// Availability.
	if cp.w.Spec.Replicas != nil && *cp.w.Spec.Replicas < 2 {
		t.Errorf("replicas %d, want 2 or more", *cp.w.Spec.Replicas)
	}
	if _, ok := hpas[o.Metadata.Name]; ok {
		if cp.w.Spec.Replicas != nil {
			t.Error("replicas set while an HPA scales this Deployment: every apply resets its count")
		}
	} else if cp.w.Spec.Replicas == nil {
		t.Error("no replicas and no HPA: one replica")
	}
	if _, isGateway := cs.gateways[cp.binary]; isGateway {
		if _, ok := hpas[o.Metadata.Name]; !ok {
			t.Error("gateway without a HorizontalPodAutoscaler")
		}
	}
	if len(ps.TopologySpreadConstraints) == 0 {
		t.Error("no topologySpreadConstraints")
	}
	pdbFound := false
	for _, po := range m.ofKind("PodDisruptionBudget") {
		var p pdb
		po.decode(t, &p)
		pdbFound = pdbFound || selects(p.Spec.Selector.MatchLabels, cp.w.Spec.Template.Metadata.Labels)
	}
	if !pdbFound {
		t.Error("no PodDisruptionBudget selects its pods")
	}
}

func mustPort(t testing.TB, addr string) int32 {
	t.Helper()
	p, err := portOf(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	return int32(n)
}

// serviceTarget resolves a Service port (by name or number) to the
// Deployment it selects and the container port it reaches.
func serviceTarget(t testing.TB, m manifests, comps []component, svcName string, port intOrString) (component, int32, string, bool) {
	t.Helper()
	o, ok := m.find("Service", svcName)
	if !ok {
		return component{}, 0, "", false
	}
	var s service
	o.decode(t, &s)
	for _, cp := range comps {
		if !selects(s.Spec.Selector, cp.w.Spec.Template.Metadata.Labels) {
			continue
		}
		for _, sp := range s.Spec.Ports {
			if (port.Str != "" && sp.Name == port.Str) || (port.Str == "" && sp.Port == port.Int) {
				target := sp.TargetPort
				if target == (intOrString{}) {
					target = intOrString{Int: sp.Port}
				}
				cport, ok := cp.c.port(target)
				return cp, cport, sp.AppProtocol, ok
			}
		}
	}
	return component{}, 0, "", false
}

func TestServices(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	comps := m.components(t)
	for _, o := range m.ofKind("Service") {
		var s service
		o.decode(t, &s)
		for _, sp := range s.Spec.Ports {
			if _, _, _, ok := serviceTarget(t, m, comps, o.Metadata.Name, intOrString{Int: sp.Port}); !ok {
				t.Errorf("%s: port %d reaches no container port of a Deployment it selects", o, sp.Port)
			}
		}
	}
	// The gateways' decision_url is the decision Service's h2c port.
	cs := loadConfigs(t)
	for name, g := range cs.gateways {
		host, port := hostPort(t, g.DecisionURL)
		n, _ := strconv.Atoi(port)
		cp, cport, proto, ok := serviceTarget(t, m, comps, host, intOrString{Int: int32(n)})
		switch {
		case !ok:
			t.Errorf("%s: decision_url %s is no Service port", name, g.DecisionURL)
		case cp.binary != "decision" || cport != mustPort(t, cs.decision.WithDefaults().Listen):
			t.Errorf("%s: decision_url %s reaches %s port %d, want the decision service's public port", name, g.DecisionURL, cp.obj.Metadata.Name, cport)
		case proto != "kubernetes.io/h2c":
			t.Errorf("Service %s: appProtocol %q, want kubernetes.io/h2c", host, proto)
		}
	}
}

func TestIngress(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	cs := loadConfigs(t)
	comps := m.components(t)
	ings := m.ofKind("Ingress")
	if len(ings) != 1 {
		t.Fatalf("%d Ingresses, want one for the public hosts", len(ings))
	}
	var ing ingress
	ings[0].decode(t, &ing)

	type route struct{ host, path, binary string }
	var got []route
	tlsHosts := map[string]bool{}
	for _, tls := range ing.Spec.TLS {
		for _, h := range tls.Hosts {
			tlsHosts[h] = true
		}
	}
	for _, r := range ing.Spec.Rules {
		if !tlsHosts[r.Host] {
			t.Errorf("host %s has no TLS entry", r.Host)
		}
		for _, p := range r.HTTP.Paths {
			if p.PathType != "Prefix" || p.Backend.Service == nil {
				t.Errorf("%s%s: want pathType Prefix to a Service", r.Host, p.Path)
				continue
			}
			port := intOrString{Int: p.Backend.Service.Port.Number, Str: p.Backend.Service.Port.Name}
			cp, cport, _, ok := serviceTarget(t, m, comps, p.Backend.Service.Name, port)
			if !ok {
				t.Errorf("%s%s: Service %s port %s reaches no container port", r.Host, p.Path, p.Backend.Service.Name, port)
				continue
			}
			g, isGateway := cs.gateways[cp.binary]
			if !isGateway {
				t.Errorf("%s%s: routes to %s; only gateways are public", r.Host, p.Path, cp.obj.Metadata.Name)
				continue
			}
			if cport != mustPort(t, g.WithDefaults().Listen) {
				t.Errorf("%s%s: reaches port %d of %s, not its public port (admin ports stay private)", r.Host, p.Path, cport, cp.obj.Metadata.Name)
			}
			got = append(got, route{r.Host, p.Path, cp.binary})
		}
	}
	// Each gateway's prefix is routed on a shared host, and each of its
	// dedicated hosts at the root.
	dedicated := map[string]bool{}
	for _, g := range cs.gateways {
		for _, h := range g.Hosts {
			dedicated[h] = true
		}
	}
	for name, g := range cs.gateways {
		g = g.WithDefaults()
		if g.Prefix != "" && !slices.ContainsFunc(got, func(r route) bool {
			return !dedicated[r.host] && r.path == g.Prefix && r.binary == name
		}) {
			t.Errorf("%s: no Ingress path %s to it on the shared host", name, g.Prefix)
		}
		for _, h := range g.Hosts {
			if !slices.Contains(got, route{h, "/", name}) {
				t.Errorf("%s: no Ingress rule %s/ to it", name, h)
			}
		}
	}
}

func TestNetworkPolicy(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	cs := loadConfigs(t)
	comps := m.components(t)
	publicPort := mustPort(t, cs.decision.WithDefaults().Listen)
	var decisionPods map[string]string
	for _, cp := range comps {
		if cp.binary == "decision" {
			decisionPods = cp.w.Spec.Template.Metadata.Labels
		}
	}
	var covered bool
	for _, o := range m.ofKind("NetworkPolicy") {
		var np networkPolicy
		o.decode(t, &np)
		if !selects(np.Spec.PodSelector.MatchLabels, decisionPods) {
			continue
		}
		covered = true
		admitted := func(labels map[string]string) bool {
			for _, rule := range np.Spec.Ingress {
				allowsPort := len(rule.Ports) == 0 || slices.ContainsFunc(rule.Ports, func(p struct {
					Port intOrString `json:"port"`
				}) bool {
					return p.Port.Int == publicPort || p.Port.Str == "h2c"
				})
				for _, f := range rule.From {
					if allowsPort && f.NamespaceSelector == nil && f.PodSelector != nil && selects(f.PodSelector.MatchLabels, labels) {
						return true
					}
				}
				if allowsPort && len(rule.From) == 0 {
					return true
				}
			}
			return false
		}
		for _, cp := range comps {
			labels := cp.w.Spec.Template.Metadata.Labels
			_, isGateway := cs.gateways[cp.binary]
			if got := admitted(labels); got != isGateway {
				t.Errorf("%s: %s admitted to the decision service: %v, want %v", o, cp.obj.Metadata.Name, got, isGateway)
			}
		}
	}
	if !covered {
		t.Error("no NetworkPolicy selects the decision pods")
	}
}

// quantityBytes reads a Kubernetes binary-suffixed quantity ("1Gi",
// "512Mi"), the form the manifests use for sizes.
func quantityBytes(q string) (int64, error) {
	for suffix, mult := range map[string]int64{"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30} {
		if n, ok := strings.CutSuffix(q, suffix); ok {
			v, err := strconv.ParseInt(n, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("quantity %q: %w", q, err)
			}
			return v * mult, nil
		}
	}
	return 0, fmt.Errorf("quantity %q: want a Ki, Mi or Gi size", q)
}
