package deploy_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cloud-connector/cloud-connector/policies"
	"github.com/cloud-connector/cloud-connector/services/opa"
)

// policyKey is the ConfigMap key deploy/README.md gives a policy file: the
// path with "/" replaced by "." (ConfigMap keys cannot hold "/"); the
// volume's items map it back to the path.
func policyKey(path string) string { return strings.ReplaceAll(path, "/", ".") }

// writeConfigMapVolume lays files out the way the kubelet writes a
// ConfigMap volume with items: the content in a timestamped directory, a
// "..data" symlink to it swapped atomically on update, and top-level
// symlinks through "..data".
func writeConfigMapVolume(t testing.TB, root, stamp string, files map[string][]byte) {
	t.Helper()
	dir := filepath.Join(root, stamp)
	for p, b := range files {
		full := filepath.Join(dir, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tmp := filepath.Join(root, "..data_tmp")
	if err := os.Symlink(stamp, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(root, "..data")); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		link := filepath.Join(root, e.Name())
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join("..data", e.Name()), link); err != nil {
			t.Fatal(err)
		}
	}
}

// TestPolicyDirFromConfigMap checks the README's recipe for a hot-reloaded
// policy directory: the embedded bundle, put in a ConfigMap and mounted with
// items, loads from <mount>/..data as exactly the embedded policy, and an
// update of the ConfigMap is picked up by a reload.
func TestPolicyDirFromConfigMap(t *testing.T) {
	t.Parallel()
	files := map[string][]byte{}
	err := fs.WalkDir(policies.FS(), ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(policies.FS(), p)
		files[p] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}

	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for p := range files {
		item := "- key: " + policyKey(p) + "\n" // followed by its path
		i := strings.Index(string(readme), item)
		if i < 0 || !strings.HasPrefix(strings.TrimLeft(string(readme[i+len(item):]), " "), "path: "+p+"\n") {
			t.Errorf("README.md's policy volume lacks the item {key: %s, path: %s}", policyKey(p), p)
		}
	}

	root := t.TempDir()
	writeConfigMapVolume(t, root, "..2025_01_01_00_00_00.000000001", files)
	embedded, err := opa.New(t.Context(), opa.Config{}, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	mounted, err := opa.New(t.Context(), opa.Config{Dir: filepath.Join(root, "..data")}, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	if mounted.Revision() != embedded.Revision() {
		t.Errorf("mounted policy revision %s, want the embedded %s: the layout changes the bundle", mounted.Revision(), embedded.Revision())
	}

	// kubectl apply of a changed ConfigMap: a new timestamped directory,
	// "..data" swapped, the old directory removed.
	files["settings/data.yaml"] = append(files["settings/data.yaml"], "\n# changed\n"...)
	writeConfigMapVolume(t, root, "..2025_01_01_00_01_00.000000002", files)
	if err := os.RemoveAll(filepath.Join(root, "..2025_01_01_00_00_00.000000001")); err != nil {
		t.Fatal(err)
	}
	if err := mounted.Reload(t.Context()); err != nil {
		t.Fatal(err)
	}
	if mounted.Revision() == embedded.Revision() {
		t.Error("the ConfigMap update was not picked up by a reload")
	}
}
