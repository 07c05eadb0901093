// The colour theme: "system" (follow the OS), "light" or "dark", remembered in localStorage.
// style.css picks its colours with light-dark(), so the theme is just the used
// color-scheme: data-theme on <html>. The highlight.js sheets switch with it.

const THEME_KEY = "tokenrelay.theme";
const THEMES = new Set(["system", "light", "dark"]);
const SYSTEM_MEDIA = {
  "hljs-light": "(prefers-color-scheme: light), (prefers-color-scheme: no-preference)",
  "hljs-dark": "(prefers-color-scheme: dark)",
};

export function savedTheme() {
  try {
    const value = localStorage.getItem(THEME_KEY);
    return THEMES.has(value) ? value : "system";
  } catch {
    return "system";
  }
}

export function applyTheme(theme) {
  const root = document.documentElement;
  if (theme === "light" || theme === "dark") root.dataset.theme = theme;
  else delete root.dataset.theme;
  for (const [id, media] of Object.entries(SYSTEM_MEDIA)) {
    const link = document.getElementById(id);
    if (!link) continue;
    const wanted = id === "hljs-dark" ? "dark" : "light";
    link.media = theme === "system" ? media : theme === wanted ? "all" : "not all";
  }
}

export function setTheme(theme) {
  const value = THEMES.has(theme) ? theme : "system";
  try {
    if (value === "system") localStorage.removeItem(THEME_KEY);
    else localStorage.setItem(THEME_KEY, value);
  } catch {
    // storage disabled: the choice lasts for this page only
  }
  applyTheme(value);
}
