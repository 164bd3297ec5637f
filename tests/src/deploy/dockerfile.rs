//! The image definitions: a Dockerfile's instructions, stages and variables.

use std::collections::BTreeMap;

use super::kustomize::image_name;

#[derive(Debug, Clone)]
pub struct Dockerfile {
    pub path: String,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Images {
    pub cpu: Dockerfile,
    pub cuda: Dockerfile,
}

impl Images {
    /// The Dockerfile an image reference was built from (`council-cuda` is the CUDA build).
    pub fn for_image(&self, image: &str) -> &Dockerfile {
        if image_name(image).ends_with("-cuda") {
            &self.cuda
        } else {
            &self.cpu
        }
    }
}

impl Dockerfile {
    /// (INSTRUCTION, arguments), continuation lines joined, comments dropped.
    pub fn instructions(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut current = String::new();
        for line in self.text.lines() {
            let t = line.trim();
            if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
                continue;
            }
            if t.starts_with('#') {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(head) => {
                    current.push_str(head);
                    current.push(' ');
                }
                None => {
                    current.push_str(t);
                    let (i, args) = current
                        .split_once(char::is_whitespace)
                        .unwrap_or((current.as_str(), ""));
                    out.push((i.to_uppercase(), args.trim().to_owned()));
                    current.clear();
                }
            }
        }
        out
    }

    pub fn final_stage(&self) -> Vec<(String, String)> {
        let all = self.instructions();
        let from = all.iter().rposition(|(i, _)| i == "FROM").unwrap_or(0);
        all[from..].to_vec()
    }

    /// `ENV` of the final stage.
    pub fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (_, args) in self.final_stage().iter().filter(|(i, _)| i == "ENV") {
            for pair in args.split_whitespace() {
                if let Some((k, v)) = pair.split_once('=') {
                    env.insert(k.to_owned(), v.trim_matches('"').to_owned());
                }
            }
        }
        env
    }

    pub fn last(&self, instruction: &str) -> Option<String> {
        self.final_stage()
            .into_iter()
            .rev()
            .find(|(i, _)| i == instruction)
            .map(|(_, a)| a)
    }

    /// An exec-form (JSON array) instruction's words.
    pub fn exec_form(&self, instruction: &str) -> Option<Vec<String>> {
        let args = self.last(instruction)?;
        let start = args.find('[')?;
        serde_json::from_str(&args[start..]).ok()
    }
}
