package deploy_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

const (
	dockerfile   = "docker/Dockerfile"
	dockerignore = "docker/Dockerfile.dockerignore"
)

// imagePackages are the binaries the image must hold.
var imagePackages = []string{"./services/cmd/decision", "./gateways/cmd/ai", "./gateways/cmd/cicd"}

// dockerInstructions returns the Dockerfile's instructions with line
// continuations joined and comments dropped.
func dockerInstructions(t testing.TB) []string {
	t.Helper()
	b, err := os.ReadFile(dockerfile)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	var cur strings.Builder
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") || (line == "" && cur.Len() == 0) {
			continue
		}
		if s, ok := strings.CutSuffix(line, "\\"); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(line)
		out = append(out, strings.Join(strings.Fields(cur.String()), " "))
		cur.Reset()
	}
	return out
}

// dockerBuild returns the go build instruction and the packages it builds.
func dockerBuild(t testing.TB) (string, []string) {
	t.Helper()
	for _, ins := range dockerInstructions(t) {
		if !strings.HasPrefix(ins, "RUN ") || !strings.Contains(ins, "go build") {
			continue
		}
		var pkgs []string
		for _, f := range strings.Fields(ins[strings.Index(ins, "go build"):]) {
			if strings.HasPrefix(f, "./") {
				pkgs = append(pkgs, f)
			}
		}
		return ins, pkgs
	}
	t.Fatal("Dockerfile has no RUN ... go build")
	return "", nil
}

// dockerBinaries returns the paths the final stage installs binaries at.
func dockerBinaries(t testing.TB) []string {
	t.Helper()
	for _, ins := range dockerInstructions(t) {
		if !strings.HasPrefix(ins, "COPY --from=build ") {
			continue
		}
		f := strings.Fields(ins)[2:]
		dst := f[len(f)-1]
		var out []string
		for _, src := range f[:len(f)-1] {
			out = append(out, path.Join(dst, path.Base(src)))
		}
		return out
	}
	t.Fatal("Dockerfile has no COPY --from=build")
	return nil
}

func TestDockerfile(t *testing.T) {
	t.Parallel()
	ins := dockerInstructions(t)
	build, pkgs := dockerBuild(t)
	if !slices.Equal(slices.Sorted(slices.Values(pkgs)), slices.Sorted(slices.Values(imagePackages))) {
		t.Errorf("go build packages %v, want %v", pkgs, imagePackages)
	}
	all := strings.Join(ins, "\n")
	for _, want := range []string{"CGO_ENABLED=0", "--mount=type=cache,target=/go/pkg/mod", "--mount=type=cache,target=/root/.cache/go-build"} {
		if !strings.Contains(all, want) {
			t.Errorf("Dockerfile lacks %s", want)
		}
	}
	if !strings.Contains(build, "-trimpath") {
		t.Error("go build without -trimpath")
	}

	// The builder is the go.mod toolchain, pinned; the final stage is
	// distroless static, non-root.
	var froms []string
	for _, i := range ins {
		if strings.HasPrefix(i, "FROM ") {
			froms = append(froms, i)
		}
	}
	if len(froms) < 2 {
		t.Fatalf("want a multi-stage build, got %d stages", len(froms))
	}
	goVersion := goModVersion(t)
	if m := regexp.MustCompile(`golang:(\d+\.\d+(?:\.\d+)?)\S*`).FindStringSubmatch(froms[0]); m == nil || m[1] != goVersion {
		t.Errorf("builder %q: want golang:%s (go.mod), pinned", froms[0], goVersion)
	}
	last := froms[len(froms)-1]
	if !strings.Contains(last, "gcr.io/distroless/static") || !strings.Contains(last, ":nonroot") {
		t.Errorf("final stage %q: want gcr.io/distroless/static...:nonroot", last)
	}

	var names []string
	for _, b := range dockerBinaries(t) {
		names = append(names, path.Base(b))
	}
	for _, p := range imagePackages {
		if !slices.Contains(names, path.Base(p)) {
			t.Errorf("final stage does not copy %s", path.Base(p))
		}
	}
}

func goModVersion(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(moduleRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("go.mod has no go directive")
	}
	return string(m[1])
}

// TestDockerBuildCompiles runs the Dockerfile's go build for linux with
// cgo off, so the image's build step is known to work without Docker.
func TestDockerBuildCompiles(t *testing.T) {
	if testing.Short() {
		t.Skip("builds three binaries")
	}
	t.Parallel()
	_, pkgs := dockerBuild(t)
	out := t.TempDir()
	args := append([]string{"build", "-trimpath", "-ldflags=-s -w", "-o", out + string(filepath.Separator)}, pkgs...)
	goCmd(t, args...)
	for _, p := range pkgs {
		if _, err := os.Stat(filepath.Join(out, path.Base(p))); err != nil {
			t.Errorf("binary %s not built: %v", path.Base(p), err)
		}
	}
}

// TestDockerignoreKeepsSources checks that no file the image's binaries
// compile or embed is excluded from the build context.
func TestDockerignoreKeepsSources(t *testing.T) {
	t.Parallel()
	ignore := loadIgnore(t)
	_, pkgs := dockerBuild(t)
	out := goCmd(t, append([]string{"list", "-deps", "-json=Dir,GoFiles,EmbedFiles,Module"}, pkgs...)...)
	root, err := filepath.Abs(moduleRoot)
	if err != nil {
		t.Fatal(err)
	}
	needed := []string{"go.mod", "go.sum"}
	dec := json.NewDecoder(bytes.NewReader(out))
	for dec.More() {
		var p struct {
			Dir        string
			GoFiles    []string
			EmbedFiles []string
			Module     *struct{ Main bool }
		}
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		if p.Module == nil || !p.Module.Main {
			continue
		}
		rel, err := filepath.Rel(root, p.Dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range append(p.GoFiles, p.EmbedFiles...) {
			needed = append(needed, filepath.ToSlash(filepath.Join(rel, f)))
		}
	}
	if len(needed) < 10 {
		t.Fatalf("go list found only %v", needed)
	}
	for _, f := range needed {
		if ignore.excludes(f) {
			t.Errorf("%s excludes %s, which the build needs", dockerignore, f)
		}
	}
	// And it does keep out what it should.
	for _, f := range []string{".git/config", "deploy/k8s/decision.yaml", "services/authz/service_test.go"} {
		if !ignore.excludes(f) {
			t.Errorf("%s does not exclude %s", dockerignore, f)
		}
	}
}

func goCmd(t testing.TB, args ...string) []byte {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), "go", args...)
	cmd.Dir = moduleRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOFLAGS=-buildvcs=false")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// ignoreRules are .dockerignore patterns with BuildKit's semantics: the
// last matching pattern wins, "!" re-includes, "**" spans directories, and
// excluding a directory excludes what is under it.
type ignoreRules []struct {
	re     *regexp.Regexp
	negate bool
}

func loadIgnore(t testing.TB) ignoreRules {
	t.Helper()
	b, err := os.ReadFile(dockerignore)
	if err != nil {
		t.Fatal(err)
	}
	var rules ignoreRules
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		negate := strings.HasPrefix(line, "!")
		line = strings.TrimPrefix(path.Clean("/"+strings.TrimPrefix(line, "!")), "/")
		rules = append(rules, struct {
			re     *regexp.Regexp
			negate bool
		}{ignorePattern(line), negate})
	}
	return rules
}

func ignorePattern(p string) *regexp.Regexp {
	var b strings.Builder
	b.WriteString("^")
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case strings.HasPrefix(p[i:], "**/"):
			b.WriteString("(.*/)?")
			i += 2
		case strings.HasPrefix(p[i:], "**"):
			b.WriteString(".*")
			i++
		case c == '*':
			b.WriteString("[^/]*")
		case c == '?':
			b.WriteString("[^/]")
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	b.WriteString("$")
	return regexp.MustCompile(b.String())
}

func (rules ignoreRules) excludes(file string) bool {
	excluded := false
	for _, r := range rules {
		for p := file; p != "." && p != "/"; p = path.Dir(p) {
			if r.re.MatchString(p) {
				excluded = !r.negate
				break
			}
		}
	}
	return excluded
}
